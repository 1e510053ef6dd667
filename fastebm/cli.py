"""The ``fastebm`` command.

    fastebm train RECIPE [section.key=value ...] [--print-config]
    fastebm sft RECIPE [section.key=value ...] [--print-config]
    fastebm data sample OUT_DIR
    fastebm data check RECORDS [--video-root DIR]
    fastebm data precompute RECORDS [--video-root DIR] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _setup_logging(run_dir: str | None = None, level=logging.INFO) -> None:
    from rich.logging import RichHandler

    handlers: list[logging.Handler] = [RichHandler(show_path=False, rich_tracebacks=False)]
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(run_dir, "train.log"))
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    logging.basicConfig(level=level, format="%(message)s", handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args) -> int:
    from fastebm.config import load_config, to_commented_toml

    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(to_commented_toml(cfg))
        return 0
    from fastebm.train.trainer import Trainer

    _setup_logging(os.path.expanduser(cfg.run.output_dir))
    log = logging.getLogger("fastebm")
    trainer = Trainer(cfg)
    log.info("training %s for %d steps -> %s", cfg.model.path or f"tiny {cfg.model.tiny}", cfg.train.steps,
             trainer.run_dir)
    try:
        trainer.train()
    except KeyboardInterrupt:
        log.warning("stopped at step %d; resume with train.resume=true", trainer.step)
        return 130
    log.info("done: %d steps; metrics in %s", trainer.step, trainer.metrics.path)
    return 0


def _cmd_sft(args) -> int:
    from fastebm.config import load_config, to_commented_toml

    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(to_commented_toml(cfg))
        return 0
    from fastebm.train.sft import SFTTrainer

    _setup_logging(os.path.expanduser(cfg.run.output_dir))
    trainer = SFTTrainer(cfg)
    trainer.train()
    logging.getLogger("fastebm").info("done: %d SFT steps; metrics in %s", trainer.step, trainer.metrics.path)
    return 0


def _cmd_data_sample(args) -> int:
    from fastebm.data.sample import write_sample_dataset

    paths = write_sample_dataset(args.out_dir)
    print(f"sample dataset in {args.out_dir}: records {paths['train']}, CoT {paths['cot']}, "
          f"profiles {paths['profiles']}")
    return 0


def _cmd_data_check(args) -> int:
    from fastebm.data.check import check_records

    return 0 if check_records(args.records, args.video_root) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastebm", description="EBM-RL (GRPO) trainer for video VLMs")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe with GRPO")
    t.add_argument("recipe", help="TOML recipe, e.g. recipes/tiny.toml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides (beat the recipe)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_cmd_train)

    f = sub.add_parser("sft", help="CoT-SFT stage: supervised training on the process + solution of CoT records")
    f.add_argument("recipe", help="TOML recipe, e.g. recipes/tiny_sft.toml")
    f.add_argument("overrides", nargs="*", help="section.key=value overrides (beat the recipe)")
    f.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    f.set_defaults(func=_cmd_sft)

    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("sample", help="write the bundled sample dataset (records, profiles, CoT, clips)")
    s.add_argument("out_dir")
    s.set_defaults(func=_cmd_data_sample)
    c = d.add_parser("check", help="validate records and decode every video; exit 1 if anything is bad")
    c.add_argument("records")
    c.add_argument("--video-root", default="", help="folder video_path is relative to (default: the records' folder)")
    c.set_defaults(func=_cmd_data_check)
    try:
        from fastebm.data import precompute
    except ImportError:  # the video cache ships with the video pipeline
        precompute = None
    if precompute is not None:
        precompute.add_parser(d)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fastebm.config import ConfigError
    from fastebm.data import DataError

    try:
        return args.func(args) or 0
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"fastebm: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # TrainingError, CheckpointError: the message says what and where
        from fastebm.train.checkpoint import CheckpointError
        from fastebm.train.trainer import TrainingError

        if not isinstance(e, (TrainingError, CheckpointError)):
            raise
        print(f"fastebm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
