"""Which frames to take: the policy's fps rule (as qwen-vl-utils) and the CLIP reward's duration rule.

Both rules work on frame indices in presentation order, so two backends that agree on the stream's
frame count and frame rate (both come from ``probe``) take the very same frames.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def policy_num_frames(total_frames: int, video_fps: float, *, fps: float = 2.0, min_frames: int = 4,
                      max_frames: int = 16, frame_factor: int = 2) -> int:
    """Number of policy frames, as qwen-vl-utils ``smart_nframes``: ``duration * fps`` clamped to
    [min_frames, max_frames] and to the stream, floored to a multiple of ``frame_factor`` (Qwen's
    temporal patch of 2). Returns 0 when the stream is too short to give ``frame_factor`` frames."""
    min_n = math.ceil(min_frames / frame_factor) * frame_factor
    max_n = math.floor(min(max_frames, total_frames) / frame_factor) * frame_factor
    n = total_frames / video_fps * fps
    n = min(max(n, min_n), max_n, total_frames)
    return int(math.floor(n / frame_factor) * frame_factor)


def evenly_spaced(total_frames: int, n: int) -> list[int]:
    """``n`` indices from 0 to total_frames - 1, evenly spaced and rounded (torch.linspace(...).round())."""
    if n <= 0:
        return []
    if n == 1:
        return [0]
    # torch, float32, exactly as the reference (half-way cases round like it does).
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def policy_frame_indices(total_frames: int, video_fps: float, *, fps: float = 2.0, min_frames: int = 4,
                         max_frames: int = 16, frame_factor: int = 2) -> list[int]:
    """Policy frame indices: ``policy_num_frames`` of them, evenly spaced over the whole stream."""
    n = policy_num_frames(total_frames, video_fps, fps=fps, min_frames=min_frames,
                          max_frames=max_frames, frame_factor=frame_factor)
    return evenly_spaced(total_frames, n)


def sample_fps(num_sampled: int, total_frames: int, video_fps: float) -> float:
    """Frame rate of the sampled frames, as qwen-vl-utils: n / total_frames * video_fps."""
    return num_sampled / max(total_frames, 1e-6) * video_fps


def clip_num_frames(duration: float) -> int:
    """CLIP-reward frames by duration (DESIGN.md section 1): <5 s: 4, <15 s: 8, <60 s: 16, else 32."""
    if duration < 5:
        return 4
    if duration < 15:
        return 8
    if duration < 60:
        return 16
    return 32


def clip_frame_indices(total_frames: int, video_fps: float) -> list[int]:
    """CLIP-reward frame indices as the reference's ``get_dynamic_indices``: duration = frames / fps,
    n by ``clip_num_frames``; every frame when the stream has no more than n; else
    ``np.linspace(0, total - 1, n)`` truncated to integers (the reference truncates, not rounds)."""
    if video_fps <= 0:
        video_fps = 25.0
    n = clip_num_frames(total_frames / video_fps)
    if total_frames <= n:
        return list(range(total_frames))
    return np.linspace(0, total_frames - 1, n, dtype=int).tolist()
