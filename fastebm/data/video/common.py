"""Types shared by the video backends: the error, the metadata, the decoded clip and the model-ready sample."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

MAX_SIDE = 8192
"""Largest accepted source width or height (8K); bigger headers are treated as corrupt ("absurd dimensions")."""
MAX_ASPECT = 200
"""Largest accepted aspect ratio (Qwen2-VL's ``smart_resize`` refuses more)."""


class VideoError(Exception):
    """A video that cannot be used. ``.path`` is the file, ``.reason`` a short human reason.

    Raised for every bad input (missing, empty, truncated, not a video, too few frames, absurd
    dimensions, unsupported codec for the asked backend, timeout). Inside training the sample is
    skipped and ``reason`` goes to ``skipped.jsonl``.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes
        return (VideoError, (self.path, self.reason))


@dataclass
class StreamInfo:
    """What demuxing (no decoding) tells about the first video stream."""

    codec: str
    """FFmpeg codec name: h264, hevc, vp8, vp9, av1, mjpeg, ..."""
    width: int
    height: int
    num_frames: int
    """Frames in the stream, counted from its packets (not the header's claim)."""
    timestamps: list[float]
    """Presentation time of every frame (s, from the first frame), in presentation order."""
    duration: float
    """Seconds from the first frame's start to the last frame's end."""
    fps: float
    """Average frame rate: num_frames / duration (what decord and torchcodec call average fps)."""
    keyframes: list[int] = field(default_factory=list)
    """Indices (presentation order) of key frames: where a seeking decoder may start."""
    pts: list[int] = field(default_factory=list)
    """Raw presentation timestamps in the stream's time base, sorted (index -> pts)."""


@dataclass
class VideoMeta:
    """Metadata of a decode: the source, which backend decoded it and which frames were taken."""

    path: str
    backend: str
    """``pyav`` or ``dali`` (``dali`` on CPU or GPU; see ``device``)."""
    codec: str
    width: int
    """Source width (pixels)."""
    height: int
    """Source height (pixels)."""
    fps: float
    """Source average frame rate."""
    duration: float
    """Source duration (s)."""
    num_frames: int
    """Frames in the source stream."""
    frame_indices: list[int]
    """Source indices (presentation order) of the returned / policy frames."""
    timestamps: list[float]
    """Presentation times (s) of ``frame_indices``."""
    device: str = "cpu"
    """Where the frames were decoded: ``cpu`` or ``cuda:N``."""
    clip_frame_indices: list[int] = field(default_factory=list)
    """Source indices of the CLIP-reward frames (``load_video_sample`` only)."""
    clip_timestamps: list[float] = field(default_factory=list)
    """Presentation times (s) of ``clip_frame_indices``."""
    sample_fps: float = 0.0
    """Frame rate of the sampled policy frames, as the reference: n / num_frames * fps."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DecodedVideo:
    """Frames of one decode: ``frames`` uint8 [T, H, W, 3] (RGB, source resolution) and ``meta``."""

    frames: torch.Tensor
    meta: VideoMeta


@dataclass
class VideoSample:
    """One clip, decoded once, ready for the policy (Qwen2-VL video input) and the CLIP reward."""

    pixel_values_videos: torch.Tensor
    """float32 [N, 3 * temporal_patch_size * patch_size ** 2]: OpenAI-CLIP-normalised patches in
    Qwen2-VL order, N = t * h * w of ``video_grid_thw``."""
    video_grid_thw: torch.Tensor
    """int64 [1, 3]: (t, h, w) in patches (t = frames / temporal_patch_size)."""
    second_per_grid_ts: float
    """Seconds per temporal patch: temporal_patch_size / sample_fps (Qwen2.5-VL M-RoPE)."""
    clip_frames: torch.Tensor
    """uint8 [K, S, S, 3]: the CLIP-reward frames, resized (shorter side S, bicubic) and centre-cropped
    to S = ``VideoConfig.clip_size`` as CLIP's processor does; ``clip_pixel_values`` normalises them.
    With clip_size 0: source resolution [K, H, W, 3]."""
    meta: VideoMeta
    num_video_tokens: int
    """Tokens the video takes in the LLM sequence: prod(video_grid_thw) // merge_size ** 2."""
    frames: Optional[torch.Tensor] = None
    """uint8 [T, h, w, 3]: the resized policy frames before normalisation (what the cache stores)."""
