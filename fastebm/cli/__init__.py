"""The ``fastebm`` command: one module per group of subcommands, each adding its own parsers.

    fastebm train RECIPE [section.key=value ...] [--print-config] [--nproc-per-node N ...]
    fastebm sft RECIPE [section.key=value ...] [--print-config] [--nproc-per-node N ...]
    fastebm export CHECKPOINT_DIR OUT_DIR
    fastebm data sample OUT_DIR
    fastebm data check RECORDS [--video-root DIR]
    fastebm data precompute RECORDS [--video-root DIR] [--cache-dir DIR] [--config RECIPE]
    fastebm doctor [--recipe RECIPE] [--compile sm_80,sm_90 [--subset]] [--costs] [--json PATH]

Errors a user can fix (a bad recipe, record, file or checkpoint) print one line naming the file and
the field and exit non-zero; bugs keep their traceback.
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

    p = argparse.ArgumentParser(prog="fastebm", description="EBM-RL (GRPO) trainer for video VLMs")
    sub = p.add_subparsers(dest="command", required=True)
    train.add_parsers(sub)
    data.add_parsers(sub)
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

    try:
        return args.func(args) or 0
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"fastebm: error: {where()}{e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # TrainingError, CheckpointError: the message says what and where
        from fastebm.train.checkpoint import CheckpointError
        from fastebm.train.trainer import TrainingError

        if not isinstance(e, (TrainingError, CheckpointError)):
            raise
        print(f"fastebm: error: {where()}{e}", file=sys.stderr)
        return 1


def where() -> str:
    return f"rank {rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
