"""Video: decode each clip once (PyAV or DALI), sample policy and CLIP frames, make Qwen2-VL inputs.

Public API::

    from fastebm.data.video import decode, load_video_sample, VideoError, VideoSample, smart_resize

    d = decode("clip.mp4", fps=2.0)               # d.frames uint8 [T, H, W, 3], d.meta: VideoMeta
    s = load_video_sample("clip.mp4", cfg.video)  # s.pixel_values_videos, s.video_grid_thw, s.clip_frames ...

    with VideoPrefetcher(cfg.video) as pf:          # decode ahead, each clip under video.timeout_s
        pf.prefetch(paths); s = pf.get(paths[0])    # or: for path, item in pf.map(paths)

Modules by job: ``decoder`` (decode, load_video_sample), ``prefetch`` (VideoPrefetcher), ``backend``
(which decoder takes a file), ``stats`` (decode counters), ``threads`` (torch threads of decode
threads), ``cache``, ``sampling``, ``preprocess``, ``pyav_backend``, ``dali_backend``, ``common`` (types).

See docs/video.md for backends, sampling rules, the cache, the prefetcher and bad-input handling.
"""
from .backend import CPU_PREFERENCE, choose_backend
from .decoder import (
    build_sample,
    decode,
    decode_sample_frames,
    load_sample_frames,
    load_video_sample,
    sampling_params,
)
from .cache import VideoCache, content_hash
from .common import DecodedVideo, StreamInfo, VideoError, VideoMeta, VideoSample
from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_pixel_values,
    clip_resize_crop,
    normalize_patchify,
    resize_frames,
    smart_resize,
)
from .prefetch import VideoPrefetcher
from .pyav_backend import probe
from .sampling import clip_frame_indices, clip_num_frames, policy_frame_indices, policy_num_frames
from .stats import decode_stats, reset_decode_stats

__all__ = [
    "CPU_PREFERENCE", "DecodedVideo", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "StreamInfo", "VideoCache",
    "VideoError", "VideoMeta", "VideoPrefetcher", "VideoSample", "build_sample", "choose_backend", "clip_frame_indices",
    "clip_num_frames", "clip_pixel_values", "clip_resize_crop", "content_hash", "decode",
    "decode_sample_frames", "decode_stats", "load_video_sample", "normalize_patchify",
    "policy_frame_indices", "policy_num_frames", "probe", "reset_decode_stats", "resize_frames",
    "load_sample_frames", "sampling_params", "smart_resize",
]
