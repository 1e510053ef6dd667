"""``fastebm data``: the sample dataset, record checks and the video / CLIP cache ahead of a run.

    fastebm data sample OUT_DIR
    fastebm data check RECORDS [--video-root DIR]
    fastebm data precompute RECORDS --cache-dir DIR [--config RECIPE] [--set video.fps=1 ...]

``precompute`` decodes every distinct video of the records once (policy and CLIP frames, with the
recipe's ``[video]`` sampling parameters, which are part of the cache key: precompute with the recipe
you train with) and stores it in ``--cache-dir`` (default: the recipe's ``video.cache_dir``). Clips
already cached are only hashed. Bad files are reported (``--skipped FILE`` writes them as JSONL, the
same fields as the trainer's skipped.jsonl) and do not stop the run. When the recipe (``--config``)
enables the ``clip`` reward, each clip's CLIP frame embeddings are computed too and stored beside the
clips (``CACHE_DIR/clip_embeddings``), where the reward looks first.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_parsers(sub) -> None:
    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("sample", help="write the bundled sample dataset (records, profiles, CoT, clips)")
    s.add_argument("out_dir")
    s.set_defaults(func=cmd_sample)
    c = d.add_parser("check", help="validate records and decode every video; exit 1 if anything is bad")
    c.add_argument("records")
    c.add_argument("--video-root", default="", help="folder video_path is relative to (default: the records' folder)")
    c.add_argument("--allow-outside-root", action="store_true", help="accept video_path values outside the video root")
    c.set_defaults(func=cmd_check)
    add_precompute_parser(d)


def cmd_sample(args) -> int:
    from fastebm.data.sample import write_sample_dataset

    paths = write_sample_dataset(args.out_dir)
    print(f"sample dataset in {args.out_dir}: records {paths['train']}, CoT {paths['cot']}, "
          f"profiles {paths['profiles']}")
    return 0


def cmd_check(args) -> int:
    from fastebm.data.check import check_records

    return 0 if check_records(args.records, args.video_root, allow_outside_root=args.allow_outside_root) else 1


def add_precompute_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("precompute", help="decode and cache every video of a records file ahead of a run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", help="records file (EBM JSON array or JSONL) with video_path fields")
    p.add_argument("--video-root", default="", help="folder video_path is relative to (default: the records' folder)")
    p.add_argument("--allow-outside-root", action="store_true", help="accept video_path values outside the video root")
    p.add_argument("--cache-dir", default="", help="cache folder (default: the recipe's video.cache_dir)")
    p.add_argument("--config", default="", help="recipe TOML whose [video] section sets the sampling parameters")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: video.num_workers)")
    p.add_argument("--skipped", default="", help="write the clips that failed here (JSONL: video, reason)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="video.KEY=VALUE",
                   help="override a [video] setting (repeatable), e.g. --set video.fps=1")
    p.set_defaults(func=cmd_precompute)
    return p


def clip_embedder(config_path: str, cache_dir: str):
    """A callback embedding a batch of clips' CLIP frames into the reward's on-disk cache, when the
    recipe enables the clip reward; else None."""
    if not config_path:
        return None
    from fastebm.config import load_config
    from fastebm.rewards.clip import FrameEmbeddingCache, build_clip_model, frame_embeddings

    full = load_config(config_path)
    if "clip" not in full.rewards.enabled:
        return None
    model = build_clip_model(full.rewards.clip, full.model.tiny_cache_dir)
    cache = FrameEmbeddingCache(model.key, cache_dir)
    return lambda clips: frame_embeddings(model, cache, clips)


def cmd_precompute(args) -> int:
    from fastebm.data.precompute import precompute, video_config, video_paths

    cfg = video_config(args.config, args.overrides)
    if args.cache_dir:
        cfg.cache_dir = args.cache_dir
    if not cfg.cache_dir:
        print("fastebm data precompute: no cache directory: pass --cache-dir or set video.cache_dir", file=sys.stderr)
        return 2
    paths = video_paths(args.records, args.video_root, args.allow_outside_root)
    t0 = time.monotonic()
    res = precompute(paths, cfg, args.workers, embed_clips=clip_embedder(args.config, cfg.cache_dir))
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
