"""Fill the video cache ahead of a run, so training decodes nothing (``fastebm data precompute``).

Every distinct video of a records file is decoded once (policy and CLIP frames, with the
``[video]`` sampling parameters, which are part of the cache key) and stored in ``cfg.cache_dir``.
Clips already cached are only hashed. Bad files are returned, never fatal. Decoding runs on
``VideoPrefetcher.map`` (``video.num_workers`` workers ahead, each clip under ``video.timeout_s``).
``embed_clips`` (the command passes the CLIP reward's frame embedder when the recipe enables it) is
called on the CLIP frames of every 8 decoded clips.
"""
from __future__ import annotations

from typing import Callable, Optional


def video_config(config_path: str = "", overrides: list[str] | None = None):
    """The [video] section of a recipe (or the defaults) with ``video.*`` overrides applied."""
    from fastebm.config import Config, ConfigError, apply_table, load_config, parse_overrides

    if config_path:
        return load_config(config_path, overrides).video
    table = parse_overrides(overrides or [])
    bad = [k for k in table if k != "video"]
    if bad:
        raise ConfigError(f"command line: precompute takes only video.* overrides without --config, got {bad[0]}.*")
    cfg = Config()
    apply_table(Config, table, "", "command line", base=cfg)
    return cfg.video


def video_paths(records_path: str, video_root: str = "", allow_outside_root: bool = False) -> list[str]:
    """Distinct absolute video paths of a records file, in first-seen order (DataError for a path
    outside the video root, unless ``allow_outside_root``)."""
    from fastebm.data.records import load_records, resolve_video

    seen, out = set(), []
    for r in load_records(records_path):
        p = resolve_video(r, video_root, allow_outside_root)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def precompute(paths: list[str], cfg, num_workers: int | None = None,
               embed_clips: Optional[Callable[[list], object]] = None) -> dict:
    """Decode-and-cache ``paths``; returns {"decoded": n, "cached": n, "skipped": [{"video", "reason"}],
    "clip_embedded": n}. ``embed_clips(list of CLIP frame tensors)`` runs on every 8 clips (one
    image-tower pass each) when given."""
    from fastebm.data.video import VideoError, VideoPrefetcher, decode_stats, reset_decode_stats

    if not cfg.cache_dir:
        raise ValueError("precompute needs a cache directory: --cache-dir or video.cache_dir")
    reset_decode_stats()
    skipped, pending, embedded = [], [], 0

    def embed():
        nonlocal embedded
        if embed_clips is not None and pending:
            embed_clips(pending)
            embedded += len(pending)
        pending.clear()

    with VideoPrefetcher(cfg, num_workers) as pf:
        for path, item in pf.map(paths):  # input order; a bad clip is an item, never fatal
            if isinstance(item, VideoError):
                skipped.append({"video": path, "reason": item.reason})
                continue
            pending.append(item.clip_frames)
            if len(pending) >= 8:
                embed()
    embed()
    st = decode_stats()
    return {"decoded": st["decodes"], "cached": st["cache_hits"], "skipped": skipped, "clip_embedded": embedded}
