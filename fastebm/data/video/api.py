"""The decoder interface: ``decode`` (frames + metadata) and ``load_video_sample`` (model-ready clip).

Backend choice (``backend`` / ``video.backend``):

- ``pyav``: PyAV on the CPU, every codec FFmpeg decodes.
- ``dali``: DALI; on a GPU (``device="mixed"``) H.264/HEVC/AV1/VP8/VP9/MJPEG/MPEG-4, on the CPU
  only VP8/VP9/MJPEG. Asking DALI for a codec it cannot decode here is a ``VideoError`` naming the
  file and the codec, never a silent fallback.
- ``auto``: DALI on a GPU when it is installed and takes the codec; on the CPU, per file, the
  backend in ``CPU_PREFERENCE`` for the codec (the faster one in bench/test_bench_video.py),
  else PyAV. The choice is in ``meta.backend`` and logged once per (codec, choice).

Every call counts in ``decode_stats()`` (decodes per backend, cache hits), so tests can check that
each clip is decoded once per step.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from typing import Callable, Optional, TypeVar

import torch

from . import dali_backend, pyav_backend
from .common import DecodedVideo, StreamInfo, VideoError, VideoMeta, VideoSample
from .preprocess import clip_resize_crop, normalize_patchify, resize_frames, smart_resize
from .sampling import clip_frame_indices, evenly_spaced, policy_frame_indices, policy_num_frames, sample_fps

log = logging.getLogger("fastebm.video")

CPU_PREFERENCE = {"vp9": "pyav", "vp8": "pyav", "mjpeg": "pyav"}
"""Backend ``auto`` takes on the CPU per codec, from the bench on the 2-core CPU dev machine
(720p VP9: PyAV ~ 2x DALI-CPU). Codecs not listed: PyAV (the only CPU backend that decodes them)."""

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# Decode accounting
# ----------------------------------------------------------------------------------------------

_stats_lock = threading.Lock()
_stats: Counter = Counter()


def decode_stats() -> dict:
    """Counts since the last reset: ``decodes`` (files decoded), ``decodes_<backend>``,
    ``cache_hits``, ``errors``; and ``by_path`` {path: decodes} for once-per-step checks."""
    with _stats_lock:
        out = {k: v for k, v in _stats.items() if not k.startswith("path:")}
        out["by_path"] = {k[5:]: v for k, v in _stats.items() if k.startswith("path:")}
        for k in ("decodes", "cache_hits", "errors"):
            out.setdefault(k, 0)
        return out


def reset_decode_stats() -> None:
    with _stats_lock:
        _stats.clear()


def count(event: str, path: Optional[str] = None, backend: Optional[str] = None) -> None:
    """Record a decode (``decode``), a cache hit (``cache_hit``) or an error (``error``)."""
    with _stats_lock:
        if event == "decode":
            _stats["decodes"] += 1
            if backend:
                _stats[f"decodes_{backend}"] += 1
            if path:
                _stats[f"path:{path}"] += 1
        elif event == "cache_hit":
            _stats["cache_hits"] += 1
        elif event == "error":
            _stats["errors"] += 1


# ----------------------------------------------------------------------------------------------
# Decode threads and torch's intra-op threads
# ----------------------------------------------------------------------------------------------


def keep_torch_threads() -> None:
    """Call in a thread before it starts decode threads: fixes its own torch thread count.

    ``torch.set_num_threads`` in a decode thread (``decode_thread_init``) also lowers the count a
    thread takes at its first parallel op; a thread that has asked once (this call) keeps its own.
    """
    torch.get_num_threads()


def decode_thread_init() -> None:
    """First call in every thread that decodes video: its torch ops run on one thread.

    A thread that runs a parallel torch op gets an OpenMP thread team of its own; once a process
    has more OpenMP threads than cores, libgomp throttles its spin-wait and every parallel op of
    the main thread pays a thread wake-up. On the 2-core dev machine, while one decode thread with
    a team was alive, the main thread's small ops (softmax, a (8, 256) x (256, 768) matmul — a
    decode step is made of these) ran 3-8x slower. The decode threads are the parallelism.
    """
    torch.set_num_threads(1)


def decode_thread_pool(num_workers: int):
    """A ThreadPoolExecutor of ``num_workers`` decode threads (``decode_thread_init`` in each)."""
    from concurrent.futures import ThreadPoolExecutor

    keep_torch_threads()
    return ThreadPoolExecutor(num_workers, thread_name_prefix="fastebm-video", initializer=decode_thread_init)


# ----------------------------------------------------------------------------------------------
# Deadlines: a hung decode becomes a VideoError
# ----------------------------------------------------------------------------------------------


class _Worker(threading.Thread):
    """A daemon thread that runs one call at a time; abandoned (never reused) if a call overruns.

    Threads are reused so DALI's per-thread pipelines are built once; a thread stuck in a C call
    cannot be killed, so it is left behind (daemon: it never blocks exit). The prefetcher's
    process workers are killed instead.
    """

    def __init__(self):
        super().__init__(daemon=True, name="fastebm-video-decode")
        self.tasks: queue.Queue = queue.Queue()
        keep_torch_threads()
        self.start()

    def run(self):
        decode_thread_init()
        while True:
            fn, box, done = self.tasks.get()
            try:
                box.append((True, fn()))
            except BaseException as e:  # delivered to the caller
                box.append((False, e))
            done.set()


_idle: list[_Worker] = []
_idle_lock = threading.Lock()


def run_with_deadline(fn: Callable[[], T], timeout_s: Optional[float], path: str) -> T:
    """``fn()`` with a time limit: past ``timeout_s`` seconds, ``VideoError(path, "timed out after Ns")``."""
    if not timeout_s or timeout_s <= 0:
        return fn()
    with _idle_lock:
        worker = _idle.pop() if _idle else None
    if worker is None:
        worker = _Worker()
    box: list = []
    done = threading.Event()
    worker.tasks.put((fn, box, done))
    if not done.wait(timeout_s):
        raise VideoError(path, f"timed out after {timeout_s:g}s")
    with _idle_lock:
        _idle.append(worker)
    ok, value = box[0]
    if ok:
        return value
    raise value


# ----------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------

_logged: set = set()


def gpu_available() -> bool:
    return torch.cuda.is_available()


def choose_backend(requested: str, codec: str, path: str = "", *, gpu: Optional[bool] = None) -> tuple[str, bool]:
    """(backend, on_gpu) for a file with ``codec``. Raises VideoError when ``requested`` cannot serve it."""
    gpu = gpu_available() if gpu is None else gpu
    if requested == "pyav":
        return "pyav", False
    if requested == "dali":
        if not dali_backend.available():
            raise VideoError(path, "backend 'dali' asked but nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
        if not dali_backend.can_decode(codec, gpu):
            raise VideoError(path, dali_backend.codec_reason(codec, gpu))
        return "dali", gpu
    if requested != "auto":
        raise ValueError(f"video backend {requested!r}: expected 'auto', 'pyav' or 'dali'")
    if gpu and dali_backend.available() and dali_backend.can_decode(codec, True):
        choice = ("dali", True)
    elif CPU_PREFERENCE.get(codec) == "dali" and dali_backend.available() and dali_backend.can_decode(codec, False):
        choice = ("dali", False)
    else:
        choice = ("pyav", False)
    if (codec, choice) not in _logged:
        _logged.add((codec, choice))
        log.info("video backend auto: %s files -> %s on the %s", codec, choice[0], "GPU" if choice[1] else "CPU")
    return choice


def _device_name(gpu: bool) -> str:
    return f"cuda:{torch.cuda.current_device()}" if gpu else "cpu"


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------


def _decode(path: str, info: StreamInfo, indices: list[int], backend: str, gpu: bool) -> torch.Tensor:
    if backend == "dali":
        frames = dali_backend.decode_frames(path, info, indices, gpu=gpu)
    else:
        frames = pyav_backend.decode_frames(path, info, indices)
    count("decode", path, backend)
    return frames


def decode(path, num_frames: Optional[int] = None, fps: Optional[float] = None, backend: str = "auto", *,
           min_frames: int = 4, max_frames: int = 16, timeout_s: Optional[float] = None) -> DecodedVideo:
    """Decode the sampled frames of one file: uint8 [T, H, W, 3] RGB at source resolution + metadata.

    ``num_frames``: that many frames, evenly spaced over the stream. ``fps``: the policy rule
    (``fps`` frames per second clamped to [min_frames, max_frames], even count, as qwen-vl-utils).
    Neither: every frame. ``timeout_s``: a decode that takes longer raises ``VideoError(.., "timed
    out after Ns")`` (None: no limit). Every failure is a ``VideoError`` naming the file.
    """
    path = str(path)
    if num_frames is not None and fps is not None:
        raise ValueError("decode: num_frames and fps are mutually exclusive")

    def work() -> DecodedVideo:
        info = pyav_backend.probe(path)
        name, gpu = choose_backend(backend, info.codec, path)
        if num_frames is not None:
            if num_frames > info.num_frames:
                raise VideoError(path, f"the stream has {info.num_frames} frames, fewer than the {num_frames} asked")
            indices = evenly_spaced(info.num_frames, num_frames)
        elif fps is not None:
            _check_min_frames(path, info, min_frames)
            indices = policy_frame_indices(info.num_frames, info.fps, fps=fps, min_frames=min_frames,
                                           max_frames=max_frames)
        else:
            indices = list(range(info.num_frames))
        frames = _decode(path, info, indices, name, gpu)
        meta = _meta(path, info, name, gpu, indices)
        return DecodedVideo(frames=frames, meta=meta)

    try:
        return run_with_deadline(_guarded(path, work), timeout_s, path)
    except VideoError:
        count("error")
        raise


def _guarded(path: str, fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` with library I/O and codec errors turned into VideoError (bugs still propagate)."""
    def run() -> T:
        import av

        try:
            return fn()
        except VideoError:
            raise
        except (av.error.FFmpegError, OSError, MemoryError) as e:
            raise VideoError(path, f"decode failed: {type(e).__name__}: {e}") from None
    return run


def _check_min_frames(path: str, info: StreamInfo, min_frames: int, key: str = "min_frames") -> None:
    if info.num_frames < max(min_frames, 2):
        raise VideoError(path, f"the stream has {info.num_frames} frames, fewer than the {max(min_frames, 2)} "
                               f"asked ({key})")


def _meta(path: str, info: StreamInfo, backend: str, gpu: bool, indices: list[int]) -> VideoMeta:
    return VideoMeta(path=path, backend=backend, codec=info.codec, width=info.width, height=info.height,
                     fps=info.fps, duration=info.duration, num_frames=info.num_frames,
                     frame_indices=list(indices), timestamps=[info.timestamps[i] for i in indices],
                     device=_device_name(gpu))


# ----------------------------------------------------------------------------------------------
# load_video_sample
# ----------------------------------------------------------------------------------------------


def sampling_params(cfg, patch_size: int, temporal_patch_size: int, merge_size: int) -> dict:
    """Everything besides the file's bytes that determines a VideoSample (the cache key's other half)."""
    return {"fps": float(cfg.fps), "min_frames": int(cfg.min_frames), "max_frames": int(cfg.max_frames),
            "min_pixels": int(cfg.min_pixels), "max_pixels": int(cfg.max_pixels),
            "clip_size": int(getattr(cfg, "clip_size", 224)), "patch_size": patch_size,
            "temporal_patch_size": temporal_patch_size, "merge_size": merge_size}


def decode_sample_frames(path: str, cfg, *, patch_size: int = 14, temporal_patch_size: int = 2,
                         merge_size: int = 2, backend: Optional[str] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, VideoMeta]:
    """One decode for both index sets: (policy frames uint8 [T, h, w, 3] at the smart_resize size,
    CLIP frames uint8 [K, S, S, 3], meta). What the cache stores."""
    info = pyav_backend.probe(path)
    name, gpu = choose_backend(backend or cfg.backend, info.codec, path)
    _check_min_frames(path, info, cfg.min_frames, "video.min_frames")
    n = policy_num_frames(info.num_frames, info.fps, fps=cfg.fps, min_frames=cfg.min_frames,
                          max_frames=cfg.max_frames, frame_factor=temporal_patch_size)
    if n < temporal_patch_size:
        raise VideoError(path, f"the stream has {info.num_frames} frames, too few for {temporal_patch_size} policy frames")
    policy_idx = evenly_spaced(info.num_frames, n)
    clip_idx = clip_frame_indices(info.num_frames, info.fps)
    union = sorted(set(policy_idx) | set(clip_idx))
    where = {i: k for k, i in enumerate(union)}
    try:
        h, w = smart_resize(info.height, info.width, factor=patch_size * merge_size,
                            min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    except ValueError as e:
        raise VideoError(path, f"absurd dimensions {info.width}x{info.height}: {e}") from None
    clip_size = int(getattr(cfg, "clip_size", 224))
    p_sel = torch.tensor([where[i] for i in policy_idx])
    c_sel = torch.tensor([where[i] for i in clip_idx])
    if name == "dali":
        policy_all, clip_all = dali_backend.decode_and_resize(path, info, union, (h, w), clip_size, gpu=gpu)
        count("decode", path, name)
        policy, clip = policy_all[p_sel.to(policy_all.device)], clip_all[c_sel.to(clip_all.device)]
    else:
        frames = _decode(path, info, union, name, gpu)  # (U, H, W, 3)
        policy = resize_frames(frames[p_sel], h, w)
        clip = clip_resize_crop(frames[c_sel], clip_size)
    meta = _meta(path, info, name, gpu, policy_idx)
    meta.clip_frame_indices = list(clip_idx)
    meta.clip_timestamps = [info.timestamps[i] for i in clip_idx]
    meta.sample_fps = sample_fps(len(policy_idx), info.num_frames, info.fps)
    return policy, clip, meta


def build_sample(policy: torch.Tensor, clip: torch.Tensor, meta: VideoMeta, *, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2) -> VideoSample:
    """Resized uint8 frames -> VideoSample (normalise + patchify on the frames' device)."""
    pixel_values, grid = normalize_patchify(policy, patch_size=patch_size,
                                            temporal_patch_size=temporal_patch_size, merge_size=merge_size)
    return VideoSample(pixel_values_videos=pixel_values, video_grid_thw=grid,
                       second_per_grid_ts=temporal_patch_size / meta.sample_fps, clip_frames=clip, meta=meta,
                       num_video_tokens=int(grid.prod()) // merge_size ** 2, frames=policy)


def load_sample_frames(path: str, cfg, *, patch_size: int = 14, temporal_patch_size: int = 2,
                       merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor, VideoMeta, bool]:
    """(policy frames, CLIP frames, meta, from_cache): the cache when ``cfg.cache_dir`` holds the clip,
    else one decode (stored in the cache). No time limit here (callers add it). Counts in decode_stats."""
    from .cache import VideoCache

    params = sampling_params(cfg, patch_size, temporal_patch_size, merge_size)
    cache = VideoCache(cfg.cache_dir) if getattr(cfg, "cache_dir", "") else None
    if cache is not None:
        pyav_backend.check_file(path)
        hit = cache.get(path, params)
        if hit is not None:
            count("cache_hit", path)
            return (*hit, True)
    policy, clip, meta = decode_sample_frames(path, cfg, patch_size=patch_size,
                                              temporal_patch_size=temporal_patch_size, merge_size=merge_size)
    if cache is not None:
        cache.put(path, params, policy, clip, meta)
    return policy, clip, meta, False


def load_video_sample(path, cfg, *, patch_size: int = 14, temporal_patch_size: int = 2,
                      merge_size: int = 2) -> VideoSample:
    """Decode one clip once (or read it from ``cfg.cache_dir``) and return policy input + CLIP frames.

    ``cfg`` is a ``VideoConfig``. Policy frames follow the fps/min/max rule (even count); CLIP
    frames the duration rule (4/8/16/32); both come from the same decode. Bad input and timeouts
    (``cfg.timeout_s``) raise ``VideoError``.
    """
    path = str(path)

    def work() -> VideoSample:
        policy, clip, meta, _ = load_sample_frames(path, cfg, patch_size=patch_size,
                                                   temporal_patch_size=temporal_patch_size, merge_size=merge_size)
        return build_sample(policy, clip, meta, patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                            merge_size=merge_size)

    try:
        return run_with_deadline(_guarded(path, work), cfg.timeout_s, path)
    except VideoError:
        count("error")
        raise
