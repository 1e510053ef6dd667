"""DALI backend: decode only the sampled frames, resize to the Qwen2-VL grid and to CLIP's input in one graph.

One graph for both devices: ``fn.decoders.video`` (``device="mixed"``, NVDEC, on a GPU; ``"cpu"``
otherwise) reads the encoded bytes and the frame indices, then ``fn.resize`` (bicubic, antialias)
makes the policy frames at the ``smart_resize`` size and, in the same pipeline, ``fn.resize`` +
``fn.slice`` make CLIP's shorter-side-then-centre-crop frames. Outputs reach PyTorch through DLPack
on the device they were made on (no host round trip on a GPU) and are copied once, because DALI
reuses its output buffers on the next run.

DALI 2.4's CPU decoder takes only VP8, VP9 and MJPEG; H.264/HEVC/AV1/MPEG-4 need the GPU. The GPU
path is the same graph with ``device_id`` set; it cannot run in this workplace (no DALI on the GPU
machine), see docs/video.md.

Pipelines are built once per thread and kind (DALI pipelines are not thread-safe) and fed one clip
per run through ``external_source``; the sizes are inputs too, so one pipeline serves every clip.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch

from .common import StreamInfo, VideoError

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
"""Codecs DALI 2.4 decodes on the CPU."""
GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})
"""Codecs DALI decodes with ``device="mixed"`` (NVDEC)."""

_local = threading.local()


def available() -> bool:
    """Whether nvidia-dali imports here."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def can_decode(codec: str, gpu: bool) -> bool:
    return codec in (GPU_CODECS if gpu else CPU_CODECS)


def _build(kind: str, gpu: bool, clip_size: int):
    from nvidia.dali import fn, pipeline_def, types

    device_id = torch.cuda.current_device() if gpu else None

    @pipeline_def(batch_size=1, num_threads=max(1, min(4, os.cpu_count() or 1)), device_id=device_id,
                  exec_dynamic=True, prefetch_queue_depth=1)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames_idx = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        video = fn.decoders.video(encoded, frames=frames_idx, device="mixed" if gpu else "cpu")  # (F, H, W, 3)
        if kind == "decode":
            return video
        qwen_size = fn.external_source(name="qwen_size", dtype=types.FLOAT, ndim=1)  # [h, w]
        policy = fn.resize(video, size=qwen_size, interp_type=types.INTERP_CUBIC, antialias=True)
        if clip_size <= 0:
            return policy, video
        clip_resize = fn.external_source(name="clip_resize", dtype=types.FLOAT, ndim=1)  # [nh, nw]
        clip_anchor = fn.external_source(name="clip_anchor", dtype=types.INT32, ndim=1)  # [top, left]
        clip_shape = fn.external_source(name="clip_shape", dtype=types.INT32, ndim=1)  # [S, S]
        clip = fn.resize(video, size=clip_resize, interp_type=types.INTERP_CUBIC, antialias=True)
        clip = fn.slice(clip, clip_anchor, clip_shape, axis_names="HW")
        return policy, clip

    p = pipe()
    p.build()
    return p


def _pipeline(kind: str, gpu: bool, clip_size: int):
    cache = getattr(_local, "pipes", None)
    if cache is None:
        cache = _local.pipes = {}
    key = (kind, gpu, clip_size if kind == "sample" else 0)
    if key not in cache:
        cache[key] = _build(kind, gpu, clip_size)
    return cache, key


def _to_torch(out) -> torch.Tensor:
    """One DALI output sample -> a torch tensor owned by PyTorch, on the device DALI made it on."""
    return torch.from_dlpack(out[0]).clone()


def _run(path: str, kind: str, gpu: bool, clip_size: int, feeds: dict):
    cache, key = _pipeline(kind, gpu, clip_size)
    p = cache[key]
    try:
        for name, value in feeds.items():
            p.feed_input(name, [value])
        return p.run()
    except Exception as e:  # DALI reports every failure as RuntimeError with a long trace
        cache.pop(key, None)  # a failed pipeline is not reused
        msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip() and "Critical error" not in ln
                    and "Error in" not in ln), str(e).strip())
        raise VideoError(path, f"DALI could not decode it: {msg[:300]}") from None


def _read(path: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise VideoError(path, f"cannot read: {e.strerror}") from None


def decode_frames(path: str, info: StreamInfo, indices: list[int], *, gpu: bool = False) -> torch.Tensor:
    """uint8 [len(indices), H, W, 3] at the given source indices (on the GPU when ``gpu``)."""
    if not can_decode(info.codec, gpu):
        raise VideoError(path, codec_reason(info.codec, gpu))
    (video,) = _run(path, "decode", gpu, 0, {"encoded": _read(path),
                                              "frames": np.asarray(indices, dtype=np.int32)})
    out = _to_torch(video)
    _check_count(path, out, len(indices))
    return out


def decode_and_resize(path: str, info: StreamInfo, indices: list[int], qwen_hw: tuple[int, int],
                      clip_size: int, *, gpu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``indices`` once; return (frames at ``qwen_hw`` uint8 [F, h, w, 3], CLIP frames uint8 [F, S, S, 3])."""
    from .preprocess import clip_geometry

    if not can_decode(info.codec, gpu):
        raise VideoError(path, codec_reason(info.codec, gpu))
    feeds = {"encoded": _read(path), "frames": np.asarray(indices, dtype=np.int32),
             "qwen_size": np.asarray(qwen_hw, dtype=np.float32)}
    if clip_size > 0:
        (nh, nw), (top, left) = clip_geometry(info.height, info.width, clip_size)
        feeds.update(clip_resize=np.asarray([nh, nw], dtype=np.float32),
                     clip_anchor=np.asarray([top, left], dtype=np.int32),
                     clip_shape=np.asarray([clip_size, clip_size], dtype=np.int32))
    policy, clip = _run(path, "sample", gpu, clip_size, feeds)
    policy, clip = _to_torch(policy), _to_torch(clip)
    _check_count(path, policy, len(indices))
    return policy, clip


def _check_count(path: str, frames: torch.Tensor, n: int) -> None:
    if frames.shape[0] != n:
        raise VideoError(path, f"decoded only {frames.shape[0]} of the {n} frames asked: truncated or corrupt stream")


def codec_reason(codec: str, gpu: bool) -> str:
    if gpu:
        return f"backend 'dali' cannot decode codec {codec} (DALI decodes {', '.join(sorted(GPU_CODECS))})"
    return (f"backend 'dali' on the CPU cannot decode codec {codec}: DALI's CPU decoder takes only "
            f"{', '.join(sorted(CPU_CODECS))} ({codec} needs DALI on a GPU); use video.backend = 'pyav' or 'auto'")
