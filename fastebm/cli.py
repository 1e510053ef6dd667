"""The ``fastebm`` command.

    fastebm train RECIPE [section.key=value ...] [--print-config]
    fastebm train RECIPE --nproc-per-node N [--nnodes M --node-rank R --master-addr A] [...]
    fastebm export CHECKPOINT_DIR OUT_DIR
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


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _setup_logging(run_dir: str | None = None, level=logging.INFO) -> None:
    from rich.logging import RichHandler

    rank, world = _rank(), int(os.environ.get("WORLD_SIZE", "1"))
    console = RichHandler(show_path=False, rich_tracebacks=False)
    if rank > 0:
        console.setLevel(logging.WARNING)  # rank 0 reports progress; the others only what goes wrong
    handlers: list[logging.Handler] = [console]
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        name = "train.log" if rank == 0 else f"train.rank{rank}.log"
        fh = logging.FileHandler(os.path.join(run_dir, name))
        tag = f"[rank {rank}] " if world > 1 else ""
        fh.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s: {tag}%(message)s"))
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
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return _launch(args, cfg)
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
    except RuntimeError as e:
        from fastebm.train.parallel import is_peer_failure

        if not (trainer.dist.enabled and is_peer_failure(e)):
            raise
        from fastebm.train.checkpoint import latest_checkpoint

        log.debug("collective failure", exc_info=True)
        print(f"fastebm: error: rank {trainer.dist.rank}: a collective with the other ranks failed during step "
              f"{trainer.step + 1}: another rank died or hung (the launcher's summary names it; a hang ends after "
              f"parallel.timeout_s = {cfg.parallel.timeout_s:g} s). {str(e).splitlines()[0][:300]}. "
              f"Newest complete checkpoint: {latest_checkpoint(trainer.run_dir) or '(none yet)'}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        from fastebm.train.parallel import destroy_distributed

        destroy_distributed(trainer.dist)
    log.info("done: %d steps; metrics in %s", trainer.step, trainer.metrics.path)
    return 0


def _launch(args, cfg) -> int:
    """Re-run this command under torch.distributed.run: N processes per node, M nodes."""
    import subprocess

    from fastebm.config import check_parallel

    check_parallel(cfg.parallel, args.nproc_per_node * args.nnodes, cfg.train.prompts_per_step,
                   source="command line")
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}"]
    if args.nnodes == 1 and args.master_addr is None:
        run.append("--standalone")  # one node: a free local port, no rendezvous to set up
    else:
        run += [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}",
                f"--master-addr={args.master_addr or '127.0.0.1'}", f"--master-port={args.master_port}"]
    run += ["-m", "fastebm.cli", "train", args.recipe, *args.overrides]
    rc = subprocess.call(run)
    if rc != 0:
        print(f"fastebm: error: the distributed job failed (exit status {rc}); the launcher's summary above "
              f"names the failed rank, run.output_dir/train.rank*.log hold each rank's log", file=sys.stderr)
    return rc


def _cmd_export(args) -> int:
    from fastebm.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} -> {out} (from_pretrained loads it)")
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
    t.add_argument("--nproc-per-node", type=int, default=None,
                   help="launch N processes on this node through torch.distributed.run (one per GPU)")
    t.add_argument("--nnodes", type=int, default=1, help="number of nodes (with --nproc-per-node)")
    t.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    t.add_argument("--master-addr", default=None, help="address of node 0 (multi-node)")
    t.add_argument("--master-port", type=int, default=29500, help="port on node 0 (multi-node)")
    t.set_defaults(func=_cmd_train)

    x = sub.add_parser("export", help="write a checkpoint (sharded or not) as a Hugging Face model directory")
    x.add_argument("checkpoint", help="run.output_dir/checkpoints/<step>")
    x.add_argument("out_dir", help="where the consolidated safetensors model goes")
    x.set_defaults(func=_cmd_export)

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
        print(f"fastebm: error: {_where()}{e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # TrainingError, CheckpointError: the message says what and where
        from fastebm.train.checkpoint import CheckpointError
        from fastebm.train.trainer import TrainingError

        if not isinstance(e, (TrainingError, CheckpointError)):
            raise
        print(f"fastebm: error: {_where()}{e}", file=sys.stderr)
        return 1


def _where() -> str:
    return f"rank {_rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
