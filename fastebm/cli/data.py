"""``fastebm data``: the sample dataset, record checks and the video / CLIP cache ahead of a run.

    fastebm data sample OUT_DIR
    fastebm data check RECORDS [--video-root DIR]
    fastebm data precompute RECORDS --cache-dir DIR [--config RECIPE] [--set video.fps=1 ...]
    fastebm data show-prompt RECIPE [--index N] [--sft] [section.key=value ...]
    fastebm data profiles import SRC OUT.json [--records FILE ...] [--include-atmosphere]

``show-prompt`` prints (stdout) the exact chat the policy gets for record N of the recipe's records
(``data.train``; ``--sft``: ``data.cot``), rendered by the model's chat template, with the video's
token run shown as one line (file, frames, size, tokens); what it used goes to stderr. ``profiles
import`` converts a profile database in the released run's structure (read with ``ast``, never run)
to a fastebm profiles file, and with ``--records`` lists the speakers it has no profile for.

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
    sp = d.add_parser("show-prompt", help="print the exact chat the policy gets for one record of a recipe")
    sp.add_argument("recipe", help="TOML recipe (its [data], [prompt], [video] and model)")
    sp.add_argument("overrides", nargs="*", help="section.key=value overrides (beat the recipe)")
    sp.add_argument("--index", type=int, default=0, help="record index in the records file (default 0)")
    sp.add_argument("--sft", action="store_true", help="a record of data.cot (the SFT stage's records)")
    sp.set_defaults(func=cmd_show_prompt)
    pr = d.add_parser("profiles", help="profile files").add_subparsers(dest="profiles_command", required=True)
    im = pr.add_parser("import", help="convert a release-structured Python profile database (read, never run)")
    im.add_argument("src", help="the .py file with MOVIE_PROFILE_DB (and GLOBAL_USER_PROFILES, MOVIE_ALIASES)")
    im.add_argument("out", help="the fastebm profiles JSON to write (data.profiles)")
    im.add_argument("--records", action="append", default=[], metavar="FILE",
                    help="records file(s) to match: every speaker without a profile is listed (repeatable)")
    im.add_argument("--include-atmosphere", action="store_true",
                    help="also import 'atmosphere' entries (the released lookup never reads them)")
    im.set_defaults(func=cmd_profiles_import)


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


def cmd_profiles_import(args) -> int:
    from fastebm.data.profiles import import_release_profiles, unmatched_characters
    from fastebm.data.records import load_records

    profiles, report = import_release_profiles(args.src, include_atmosphere=args.include_atmosphere)
    for path in args.records:
        report.unmatched += unmatched_characters(profiles, load_records(path))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(profiles.to_json(), f, indent=1, ensure_ascii=False)
    print("\n".join(report.lines()))
    print(f"wrote {args.out} (data.profiles = {args.out!r})")
    return 0


def _model_for_prompt(cfg):
    """(tokenizer, vision geometry, where) of the recipe's model, or (None, default geometry, why not):
    the tiny model is built on first use; a model.path that is not here leaves no tokenizer."""
    from fastebm.model.loading import load_tokenizer, resolve_model_path

    geometry = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    path = resolve_model_path(cfg.model, cfg.run.seed) if cfg.model.tiny else os.path.expanduser(cfg.model.path)
    if not os.path.isdir(path):
        return None, geometry, f"model.path {path!r} is not here: fastebm's chat template, no token counts"
    from transformers import AutoConfig

    v = AutoConfig.from_pretrained(path).vision_config
    geometry = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                    merge_size=v.spatial_merge_size)
    return load_tokenizer(path), geometry, f"tokenizer and chat template of {path}"


def cmd_show_prompt(args) -> int:
    from fastebm.config import load_config
    from fastebm.data import DataError
    from fastebm.data.profiles import Profiles
    from fastebm.data.prompts import build_chat, fit_prompt, load_templates, show_chat, template_paths
    from fastebm.data.records import load_records, resolve_video
    from fastebm.data.video import VideoError, load_video_sample
    from fastebm.train.builders import prepare_data
    from fastebm.utils import quiet_transformers

    quiet_transformers()
    cfg = load_config(args.recipe, args.overrides)
    field = "cot" if args.sft else "train"
    prepare_data(cfg.data, field)  # data.sample_dir: the sample dataset, written on first use
    path = getattr(cfg.data, field)
    records = load_records(path)
    if not 0 <= args.index < len(records):
        raise DataError(f"{path}: --index {args.index}: the file has {len(records)} records (0..{len(records) - 1})")
    rec = records[args.index]
    profiles = Profiles.load(cfg.data.profiles)
    templates = load_templates(cfg.prompt)
    tokenizer, geometry, model_note = _model_for_prompt(cfg)
    video_path = resolve_video(rec, cfg.data.video_root, cfg.data.allow_outside_root)
    video, num_video_tokens = None, 0
    if not os.path.isfile(video_path):
        video_line = f"[video: {video_path} (not found here)]"
    else:
        try:
            video = load_video_sample(video_path, cfg.video, **geometry)
        except VideoError as e:
            video_line = f"[video: {video_path} (cannot be decoded: {e})]"
        else:
            t, h, w = (int(x) for x in video.video_grid_thw[0])
            num_video_tokens = video.num_video_tokens
            n, fh, fw = video.frames.shape[0], video.frames.shape[1], video.frames.shape[2]
            spacing = cfg.video.second_per_grid or video.second_per_grid_ts
            video_line = (f"[video: {video_path} | {n} frames of {fw}x{fh} | grid {t}x{h}x{w} | "
                          f"{num_video_tokens} tokens | {spacing:g} s per temporal patch]")
    note = ""
    if tokenizer is not None and video is not None:
        fitted = fit_prompt(tokenizer, rec, profiles, templates, cfg.data.tags, num_video_tokens,
                            max_history_turns=cfg.data.max_history_turns, max_prompt_tokens=cfg.data.max_prompt_tokens)
        messages = fitted.messages
        note = (f"{len(fitted.ids)} prompt tokens ({num_video_tokens} video); dialogue turns kept "
                f"{fitted.turns_kept} of {len(rec.dialogue)}"
                + (f" (data.max_prompt_tokens = {cfg.data.max_prompt_tokens})" if cfg.data.max_prompt_tokens else ""))
    else:
        messages = build_chat(rec, profiles, templates, cfg.data.tags, cfg.data.max_history_turns)
        note = "no token count (no tokenizer or no video here): data.max_prompt_tokens not applied"
    system_file, user_file = template_paths(cfg.prompt, templates.mode)
    info = [f"record {args.index} of {path} (problem_id {rec.problem_id}): {rec.assistant} talking with "
            f"{rec.user}, {rec.data_source}",
            f"templates: system {system_file}; user {user_file}",
            f"profiles: {cfg.data.profiles or '(none)'}; missing: {', '.join(profiles.missing) or 'none'}",
            model_note, note]
    for line in info:
        print(f"# {line}", file=sys.stderr)
    print(show_chat(messages, video_line, tokenizer), end="")
    return 0
