"""The ``fastebm`` command: one module per group of subcommands, each adding its own parsers.

    fastebm train RECIPE [section.key=value ...] [--print-config] [--check] [--nproc-per-node N ...]
    fastebm sft RECIPE [section.key=value ...] [--print-config] [--check] [--nproc-per-node N ...]
    fastebm export CHECKPOINT_DIR OUT_DIR
    fastebm convert-checkpoint CHECKPOINT_DIR --trusted
    fastebm data sample OUT_DIR
    fastebm data check RECORDS [--video-root DIR]
    fastebm data precompute RECORDS [--video-root DIR] [--cache-dir DIR] [--config RECIPE]
    fastebm data show-prompt RECIPE [--index N] [--sft] [section.key=value ...]
    fastebm data profiles import SRC OUT.json [--records FILE ...]
    fastebm generate RECIPE --records FILE --out FILE [--checkpoint DIR] [--prompt-mode MODE] [section.key=value ...]
    fastebm eval auto | judge | pairwise | videoqa ...   (docs/evaluation.md)
    fastebm report RUN_DIR [--out DIR]
    fastebm doctor [--recipe RECIPE] [--compile sm_80,sm_90 [--subset]] [--costs] [--json PATH]

Errors a user can fix (a bad recipe, record, file or checkpoint) print one line naming the file and
the field and exit non-zero; bugs keep their traceback. The exit codes (``fastebm.train.stop``; the
table is in docs/reliability.md): 0 done, 1 stopped by an error (the last good checkpoint named), 2
bad recipe / data / command line, 3 run folder in use by another run, 75 preempted (SIGTERM /
SIGUSR1: the step finished and was saved), 130 Ctrl-C (saved), 143 SIGTERM to a rank outside the steps.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(run_dir: str | None = None, level=logging.INFO) -> None:
    """Rank 0 logs progress to the console; every rank logs to run_dir/train[.rankN].log."""
    from rich.logging import RichHandler

    r, world = rank(), int(os.environ.get("WORLD_SIZE", "1"))
    console = RichHandler(show_path=False, rich_tracebacks=False)
    if r > 0:
        console.setLevel(logging.WARNING)  # rank 0 reports progress; the others only what goes wrong
    handlers: list[logging.Handler] = [console]
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        name = "train.log" if r == 0 else f"train.rank{r}.log"
        fh = logging.FileHandler(os.path.join(run_dir, name))
        tag = f"[rank {r}] " if world > 1 else ""
        fh.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s: {tag}%(message)s"))
        handlers.append(fh)
    logging.basicConfig(level=level, format="%(message)s", handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    from fastebm.cli import data, doctor, train
    from fastebm.cli import eval as eval_cli

    p = argparse.ArgumentParser(prog="fastebm", description="EBM-RL (GRPO) trainer for video VLMs")
    sub = p.add_subparsers(dest="command", required=True)
    train.add_parsers(sub)
    data.add_parsers(sub)
    eval_cli.add_parsers(sub)
    doctor.add_parsers(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow the flags (fastebm train R --nproc-per-node 2 train.steps=3): argparse
    # leaves them over; anything else left over is an error, as parse_args would say.
    if getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from fastebm.config import ConfigError
    from fastebm.data import DataError
    from fastebm.train.stop import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_RUN_DIR_IN_USE, EXIT_USAGE

    try:
        return args.func(args) or 0
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"fastebm: error: {where()}{e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before the training loop (which handles its own) or in a data command
        print(f"fastebm: {where()}interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as e:  # TrainingError, CheckpointError, RunDirInUse, JudgeError: the message says what and where
        from fastebm.eval.judge_client import JudgeError
        from fastebm.train.checkpoint import CheckpointError
        from fastebm.train.rundir import RunDirInUse
        from fastebm.train.trainer import TrainingError

        if isinstance(e, RunDirInUse):
            print(f"fastebm: error: {where()}{e}", file=sys.stderr)
            return EXIT_RUN_DIR_IN_USE
        if not isinstance(e, (TrainingError, CheckpointError, JudgeError)):
            raise
        print(f"fastebm: error: {where()}{e}", file=sys.stderr)
        return EXIT_ERROR


def where() -> str:
    return f"rank {rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
