"""Decoding one clip: ``decode`` (frames + metadata) and ``load_video_sample`` (model-ready clip).

``decode_sample_frames`` is the one decode behind a sample (policy and CLIP frames of one pass);
``load_sample_frames`` adds the disk cache; ``build_sample`` normalises and patchifies (on the
frames' device); ``load_video_sample`` is all three for one clip. The backend is chosen per file
(``backend.choose_backend``) and every decode counts in ``decode_stats()``.

Time limits: ``decode(timeout_s=...)`` and ``load_video_sample`` (``video.timeout_s``) run their work
on a decode thread of ``prefetch.VideoPrefetcher`` (its on-demand worker, reused across calls) and
raise ``VideoError(path, "timed out after Ns")`` past the limit; without a limit they decode in the
calling thread. Decoding many clips ahead: ``VideoPrefetcher``.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

from . import dali_backend, pyav_backend
from .backend import choose_backend, device_name
from .common import DecodedVideo, StreamInfo, VideoError, VideoMeta, VideoSample
from .preprocess import clip_resize_crop, normalize_patchify, resize_frames, smart_resize
from .sampling import clip_frame_indices, evenly_spaced, policy_frame_indices, policy_num_frames, sample_fps
from .stats import count

T = TypeVar("T")

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
        if timeout_s and timeout_s > 0:
            from .prefetch import call_on_decode_thread

            return call_on_decode_thread(guarded(path, work), path, timeout_s)
        return guarded(path, work)()
    except VideoError:
        count("error")
        raise


def guarded(path: str, fn: Callable[[], T]) -> Callable[[], T]:
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
                     device=device_name(gpu))


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
    frames the duration rule (4/8/16/32); both come from the same decode. Bad input raises
    ``VideoError``. The time limit ``cfg.timeout_s`` (> 0) holds: the clip is decoded by
    ``VideoPrefetcher(cfg, 0, worker_type="thread").get(path)``, on a decode thread that later calls
    reuse (DALI builds its pipelines once per thread); past the limit that thread is abandoned and
    ``VideoError(path, "timed out after Ns")`` raised. ``timeout_s`` 0: decoded in the calling thread.
    """
    path = str(path)
    sizes = dict(patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size)
    if cfg.timeout_s and cfg.timeout_s > 0:
        from .prefetch import VideoPrefetcher

        with VideoPrefetcher(cfg, 0, worker_type="thread", **sizes) as pf:
            return pf.get(path)  # counts its errors
    try:
        return guarded(path, lambda: sample_now(path, cfg, sizes))()
    except VideoError:
        count("error")
        raise


def sample_now(path: str, cfg, sizes: dict, device=None) -> VideoSample:
    """``load_sample_frames`` + ``build_sample`` in the calling thread (on ``device`` when given)."""
    policy, clip, meta, _ = load_sample_frames(path, cfg, **sizes)
    if device is not None:
        policy, clip = policy.to(device, non_blocking=True), clip.to(device, non_blocking=True)
    return build_sample(policy, clip, meta, **sizes)
