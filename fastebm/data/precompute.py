"""``fastebm data precompute RECORDS``: fill the video cache ahead of a run, so training decodes nothing.

    fastebm data precompute train.json --cache-dir ~/.cache/fastebm/video [--config recipe.toml] [--set video.fps=1 ...]

Every distinct video of the records is decoded once (policy and CLIP frames, with the recipe's
``[video]`` sampling parameters, which are part of the cache key: precompute with the recipe you
train with) and stored in ``--cache-dir`` (default: the recipe's ``video.cache_dir``). Clips
already cached are only hashed. Bad files are reported (``--skipped FILE`` writes them as JSONL,
the same fields as the trainer's skipped.jsonl) and do not stop the run. When the recipe
(``--config``) enables the ``clip`` reward, each clip's CLIP frame embeddings are computed too and
stored beside the clips (``CACHE_DIR/clip_embeddings``), where the reward looks first.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("precompute", help="decode and cache every video of a records file ahead of a run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", help="records file (EBM JSON array or JSONL) with video_path fields")
    p.add_argument("--video-root", default="", help="folder video_path is relative to (default: the records' folder)")
    p.add_argument("--cache-dir", default="", help="cache folder (default: the recipe's video.cache_dir)")
    p.add_argument("--config", default="", help="recipe TOML whose [video] section sets the sampling parameters")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: video.num_workers)")
    p.add_argument("--skipped", default="", help="write the clips that failed here (JSONL: video, reason)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="video.KEY=VALUE",
                   help="override a [video] setting (repeatable), e.g. --set video.fps=1")
    p.set_defaults(func=run)
    return p


def video_config(config_path: str = "", overrides: list[str] | None = None):
    """The [video] section of a recipe (or the defaults) with ``video.*`` overrides applied."""
    from fastebm.config import Config, ConfigError, VideoConfig, _build, load_config, parse_overrides

    if config_path:
        return load_config(config_path, overrides).video
    table = parse_overrides(overrides or [])
    bad = [k for k in table if k != "video"]
    if bad:
        raise ConfigError(f"command line: precompute takes only video.* overrides without --config, got {bad[0]}.*")
    cfg = Config()
    _build(Config, table, "", "command line", base=cfg)
    return cfg.video if isinstance(cfg.video, VideoConfig) else VideoConfig()


def video_paths(records_path: str, video_root: str = "") -> list[str]:
    """Distinct absolute video paths of a records file, in first-seen order."""
    from fastebm.data.records import load_records, resolve_video

    seen, out = set(), []
    for r in load_records(records_path):
        p = resolve_video(r, video_root)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def precompute(paths: list[str], cfg, num_workers: int | None = None, clip=None) -> dict:
    """Decode-and-cache ``paths``; returns {"decoded": n, "cached": n, "skipped": [{"video", "reason"}],
    "clip_embedded": n}. ``clip``: optional (ClipModel, FrameEmbeddingCache) to embed each clip's CLIP
    frames too (in batches of 8 clips: one image-tower pass each)."""
    from fastebm.data.video import VideoError, decode_stats, reset_decode_stats
    from fastebm.data.video.loader import VideoPrefetcher

    if not cfg.cache_dir:
        raise ValueError("precompute needs a cache directory: --cache-dir or video.cache_dir")
    reset_decode_stats()
    skipped, pending, embedded = [], [], 0

    def embed():
        nonlocal embedded
        if clip is not None and pending:
            from fastebm.rewards.clip import frame_embeddings

            frame_embeddings(clip[0], clip[1], pending)
            embedded += len(pending)
        pending.clear()

    with VideoPrefetcher(paths, cfg, num_workers=num_workers) as pf:
        for path, item in pf:
            if isinstance(item, VideoError):
                skipped.append({"video": path, "reason": item.reason})
                continue
            pending.append(item.clip_frames)
            if len(pending) >= 8:
                embed()
    embed()
    st = decode_stats()
    return {"decoded": st["decodes"], "cached": st["cache_hits"], "skipped": skipped, "clip_embedded": embedded}


def clip_embedder(config_path: str, cache_dir: str):
    """(ClipModel, FrameEmbeddingCache) when the recipe enables the clip reward, else None."""
    if not config_path:
        return None
    from fastebm.config import load_config
    from fastebm.rewards.clip import FrameEmbeddingCache, build_clip_model

    full = load_config(config_path)
    if "clip" not in full.rewards.enabled:
        return None
    model = build_clip_model(full.rewards.clip, full.model.tiny_cache_dir)
    return model, FrameEmbeddingCache(model.key, cache_dir)


def run(args) -> int:
    cfg = video_config(args.config, args.overrides)
    if args.cache_dir:
        cfg.cache_dir = args.cache_dir
    if not cfg.cache_dir:
        print("fastebm data precompute: no cache directory: pass --cache-dir or set video.cache_dir", file=sys.stderr)
        return 2
    paths = video_paths(args.records, args.video_root)
    t0 = time.monotonic()
    res = precompute(paths, cfg, args.workers, clip=clip_embedder(args.config, cfg.cache_dir))
    dt = time.monotonic() - t0
    print(f"{len(paths)} videos: {res['decoded']} decoded, {res['cached']} already cached, "
          f"{len(res['skipped'])} skipped, {res['clip_embedded']} CLIP-embedded, {dt:.1f}s -> "
          f"{os.path.expanduser(cfg.cache_dir)}")
    for s in res["skipped"]:
        print(f"  skipped {s['video']}: {s['reason']}")
    if args.skipped:
        with open(args.skipped, "w", encoding="utf-8") as f:
            for s in res["skipped"]:
                f.write(json.dumps(s) + "\n")
    return 0


if __name__ == "__main__":  # python -m fastebm.data.precompute RECORDS --cache-dir DIR
    parser = argparse.ArgumentParser(prog="fastebm data")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    a = parser.parse_args(["precompute", *sys.argv[1:]])
    sys.exit(a.func(a))
