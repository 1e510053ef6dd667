"""``fastebm generate``, ``fastebm eval auto | judge | pairwise | videoqa`` and ``fastebm report``.

    fastebm generate RECIPE --records FILE --out preds.jsonl [--checkpoint DIR] [--prompt-mode ebm|cot|vanilla]
                     [--limit N] [section.key=value ...]
    fastebm eval auto PREDS --recipe RECIPE --out DIR [--teacher DIR] [section.key=value ...]
    fastebm eval judge PREDS [PREDS ...] --out DIR (--judge-url URL --judge-model NAME | --judge-local PATH)
                     [--samples 100] [--seed 0]
    fastebm eval pairwise ANCHOR OPPONENT --out DIR (--judge-url URL --judge-model NAME | --judge-local PATH)
                     [--samples 500] [--seed 42]
    fastebm eval videoqa RECIPE --bench nextqa|activitynet|pororoqa --annotations FILE --video-root DIR --out DIR
                     [--checkpoint DIR] [--answers FILE] [--video-map FILE] [--limit N] [section.key=value ...]
    fastebm report RUN_DIR [--out DIR]

``--checkpoint``: a ``from_pretrained`` directory or a fastebm checkpoint (``checkpoints/<step>``; a
sharded one is consolidated into a temporary directory first); default: the recipe's model. The
judge's key is read from FASTEBM_JUDGE_API_KEY. Protocols, reply contracts and costs:
docs/evaluation.md.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

log = logging.getLogger("fastebm")


def add_parsers(sub) -> None:
    g = sub.add_parser("generate", help="generate predictions for a records file (one JSON line per record)")
    g.add_argument("recipe", help="TOML recipe: the model, [video], [data] tags and profiles, [eval] sampling")
    g.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. eval.temperature=0)")
    g.add_argument("--records", required=True, help="records file (the released EBM format, JSON array or JSONL)")
    g.add_argument("--out", required=True, help="predictions JSONL (appended to: a rerun skips the ids in it)")
    _checkpoint_arg(g)
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    g.add_argument("--prompt-mode", choices=("ebm", "cot", "vanilla"), default="ebm",
                   help="ebm: the training prompt; cot: think then answer; vanilla: the line only (the recipe's "
                        "[prompt] templates of the mode: prompt.cot_system_file ...)")
    g.add_argument("--limit", type=int, default=0, help="only the first N records (0: all)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="evaluate predictions").add_subparsers(dest="eval_command", required=True)
    a = e.add_parser("auto", help="reward-based metrics of a predictions file, overall and per data_source")
    a.add_argument("preds", help="predictions JSONL of fastebm generate")
    a.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe")
    a.add_argument("--recipe", required=True, help="the recipe whose [rewards] section is computed")
    a.add_argument("--out", required=True, help="output directory: metrics.json, metrics.md")
    a.add_argument("--teacher", default="", help="PCG teacher model directory (default: the recipe's reference)")
    _common_args(a)
    a.set_defaults(func=cmd_auto)

    j = e.add_parser("judge", help="LLM judge, absolute 0-100 scores (VEG, CN, SPC) of one or more predictions files")
    j.add_argument("preds", nargs="+", help="predictions files, each PATH or NAME=PATH")
    _judge_args(j, samples=100, seed=0)
    j.set_defaults(func=cmd_judge)

    p = e.add_parser("pairwise", help="LLM judge, pairwise preferences with swapped positions, anchor vs opponent")
    p.add_argument("anchor", help="predictions file of the anchor (PATH or NAME=PATH)")
    p.add_argument("opponent", help="predictions file of the opponent (PATH or NAME=PATH)")
    _judge_args(p, samples=500, seed=42)
    p.set_defaults(func=cmd_pairwise)

    v = e.add_parser("videoqa", help="zero-shot VideoQA accuracy on NExT-QA, ActivityNet-QA (yes/no) or PororoQA")
    v.add_argument("recipe", help="TOML recipe: the model, [video] pixel bounds, tags")
    v.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe")
    v.add_argument("--bench", required=True, choices=("nextqa", "activitynet", "pororoqa"))
    v.add_argument("--annotations", required=True,
                   help="nextqa: the csv; activitynet: the question json; pororoqa: the question json")
    v.add_argument("--answers", default="", help="activitynet: the answer json (default: the question file's "
                                                 "name with _q -> _a)")
    v.add_argument("--video-root", required=True, help="folder of the benchmark's clips")
    v.add_argument("--video-map", default="", help="JSON {video id: file or [files]} relative to --video-root")
    v.add_argument("--out", required=True, help="output directory: predictions.jsonl, metrics.json")
    _model_args(v)
    v.add_argument("--prompt-mode", choices=("ebm", "cot", "vanilla"), default="ebm")
    v.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    v.add_argument("--frames", type=int, default=0, help="frames per clip (default: 32; pororoqa: 2 per GIF)")
    v.add_argument("--max-new-tokens", type=int, default=0, help="default: 1024 (pororoqa 1536)")
    v.set_defaults(func=cmd_videoqa)

    r = sub.add_parser("report", help="plots of a run's metrics and its evaluation results as one HTML page")
    r.add_argument("run_dir")
    r.add_argument("--out", default="", help="output directory (default: RUN_DIR/report)")
    r.set_defaults(func=cmd_report)


def _common_args(p) -> None:
    p.add_argument("--templates", default="", help="folder of template files replacing the bundled ones by name")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def _checkpoint_arg(p) -> None:
    p.add_argument("--checkpoint", default="", help="model: a from_pretrained directory or a fastebm checkpoint "
                                                    "(default: the recipe's model)")


def _model_args(p) -> None:
    _checkpoint_arg(p)
    _common_args(p)


def _judge_args(p, samples: int, seed: int) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--judge-url", default="", help="base URL of an OpenAI-compatible server (e.g. http://host:8000/v1)")
    p.add_argument("--judge-model", default="", help="the judge model's name on that server")
    p.add_argument("--judge-local", default="", help="instead: a local Qwen2-VL directory run in-process")
    p.add_argument("--samples", type=int, default=samples, help=f"samples judged (default {samples}; 0: all)")
    p.add_argument("--seed", type=int, default=seed, help="seed of the sample choice and the response order")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--max-reasks", type=int, default=2, help="re-asks after a reply that breaks the contract")
    p.add_argument("--max-retries", type=int, default=6, help="retries of HTTP 429 / 5xx with backoff")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="reply token limit (default: 4096 for a server, 512 for a local judge)")
    p.add_argument("--cache-dir", default="", help="reply cache (default: OUT/judge_cache)")
    p.add_argument("--device", default="auto", help="device of a local judge")
    _common_args(p)


def _config(recipe: str, overrides):
    from fastebm.config import load_config

    return load_config(recipe, overrides)


@contextlib.contextmanager
def model_dir(checkpoint: str, cfg):
    """The ``from_pretrained`` directory to evaluate: ``--checkpoint`` (a sharded checkpoint is
    consolidated into a temporary directory, removed afterwards) or the recipe's model."""
    from fastebm.model.loading import resolve_model_path
    from fastebm.train.checkpoint import META, checkpoint_format

    if not checkpoint:
        yield resolve_model_path(cfg.model)
        return
    path = os.path.expanduser(checkpoint)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint: {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, META)) and checkpoint_format(path) == "dcp":
        from fastebm.train.export import export_checkpoint

        with tempfile.TemporaryDirectory(prefix="fastebm-eval-") as tmp:
            log.info("consolidating the sharded checkpoint %s into %s", path, tmp)
            yield export_checkpoint(path, tmp)
        return
    yield path


def cmd_generate(args) -> int:
    from fastebm.cli import setup_logging
    from fastebm.eval.generate import generate_predictions, skipped_path_for

    setup_logging()
    cfg = _config(args.recipe, args.overrides)
    with model_dir(args.checkpoint, cfg) as path:
        st = generate_predictions(cfg, model_path=path, records_path=args.records, out_path=args.out,
                                  mode=args.prompt_mode, limit=args.limit,
                                  progress=not args.no_progress)
    print(f"generated {st.generated} ({st.already_done} already in {args.out}), skipped {st.skipped}"
          + (f" (see {skipped_path_for(args.out)})" if st.skipped else ""))
    return 0


def cmd_auto(args) -> int:
    from fastebm.cli import setup_logging
    from fastebm.eval.auto import auto_metrics

    setup_logging()
    cfg = _config(args.recipe, args.overrides)
    auto_metrics(cfg, args.preds, args.out, teacher_path=args.teacher, progress=not args.no_progress)
    with open(os.path.join(args.out, "metrics.md"), encoding="utf-8") as f:
        print(f.read(), end="")
    return 0


def _check_judge_args(args) -> None:
    """Before anything is loaded: exactly one judge."""
    from fastebm.config import ConfigError

    if bool(args.judge_local) == bool(args.judge_url and args.judge_model) or (args.judge_local and args.judge_url):
        raise ConfigError("command line: give --judge-url and --judge-model (an OpenAI-compatible server) "
                          "or --judge-local PATH (a local model), one of the two")


def _asker(args):
    from fastebm.eval.judge_client import Asker, JudgeCache, LocalJudge, OpenAIJudge

    if args.judge_local:
        judge = LocalJudge(args.judge_local, device=args.device, max_new_tokens=args.max_tokens or 512)
        info = {"kind": "local", "path": os.path.abspath(os.path.expanduser(args.judge_local))}
    else:
        judge = OpenAIJudge(args.judge_url, args.judge_model, max_tokens=args.max_tokens or 4096,
                            timeout_s=args.timeout, max_retries=args.max_retries)
        info = {"kind": "openai", "url": args.judge_url, "model": args.judge_model}
    cache = JudgeCache(args.cache_dir or os.path.join(args.out, "judge_cache"))
    return Asker(judge, cache, max_reasks=args.max_reasks, template_dir=args.templates), info


def cmd_judge(args) -> int:
    _check_judge_args(args)
    from fastebm.cli import setup_logging
    from fastebm.eval.judge import judge_absolute, load_model_preds

    setup_logging()
    models = load_model_preds(args.preds)
    asker, info = _asker(args)
    r = judge_absolute(models, asker, args.out, samples=args.samples, seed=args.seed, concurrency=args.concurrency,
                       template_dir=args.templates, progress=not args.no_progress, judge_info=info)
    for name, m in r["models"].items():
        cells = "  ".join(f"{k} {m[k]['mean']:.2f}" if m[k]["mean"] is not None else f"{k} -" for k in r["metrics"])
        print(f"{name}: {cells}  (samples {m['samples']}, failed {m['failed']})")
    print(f"requests {r['requests']} -> {os.path.join(args.out, 'judge.json')}")
    return 0


def cmd_pairwise(args) -> int:
    _check_judge_args(args)
    from fastebm.cli import setup_logging
    from fastebm.eval.judge import judge_pairwise, load_model_preds

    setup_logging()
    anchor, opponent = load_model_preds([args.anchor, args.opponent])
    asker, info = _asker(args)
    r = judge_pairwise(anchor, opponent, asker, args.out, samples=args.samples, seed=args.seed,
                       concurrency=args.concurrency, template_dir=args.templates, progress=not args.no_progress,
                       judge_info=info)
    for k, s in r["metrics"].items():
        p = "-" if s["p_value"] is None else f"{s['p_value']:.3g}"
        print(f"{k}: win {s['win']} loss {s['loss']} tie {s['tie']} errors {s['errors']}  p {p}")
    print(f"requests {r['requests']} -> {os.path.join(args.out, 'pairwise.json')}")
    return 0


def cmd_videoqa(args) -> int:
    from fastebm.cli import setup_logging
    from fastebm.eval.videoqa import run_videoqa

    setup_logging()
    cfg = _config(args.recipe, args.overrides)
    with model_dir(args.checkpoint, cfg) as path:
        r = run_videoqa(cfg, bench=args.bench, annotations=args.annotations, video_root=args.video_root,
                        out_dir=args.out, model_path=path, answers=args.answers, video_map=args.video_map,
                        limit=args.limit, mode=args.prompt_mode, frames=args.frames,
                        max_new_tokens=args.max_new_tokens, template_dir=args.templates,
                        progress=not args.no_progress)
    acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
    print(f"{args.bench}: accuracy {acc} ({r['correct']}/{r['n']}), skipped {r['skipped']} -> "
          f"{os.path.join(args.out, 'metrics.json')}")
    return 0


def cmd_report(args) -> int:
    from fastebm.eval.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")
    return 0
