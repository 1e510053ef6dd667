"""``fastebm train`` (GRPO), ``fastebm sft`` (CoT-SFT) and ``fastebm export``.

Both training commands take a recipe and ``section.key=value`` overrides, print the resolved config
with ``--print-config``, check a launch without files or GPUs with ``--check`` (at the world size of
``--nproc-per-node`` x ``--nnodes``; ``fastebm.cli.check``), and with ``--nproc-per-node N`` re-run
themselves under ``torch.distributed.run`` (N processes per node, ``--nnodes`` nodes).
"""
from __future__ import annotations

import logging
import os
import sys

from fastebm.cli import setup_logging

log = logging.getLogger("fastebm")


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a recipe with GRPO")
    _training_args(t)
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("sft", help="CoT-SFT stage: supervised training on the process + solution of CoT records")
    _training_args(f)
    f.set_defaults(func=cmd_sft)

    x = sub.add_parser("export", help="write a checkpoint (sharded or not) as a Hugging Face model directory")
    x.add_argument("checkpoint", help="run.output_dir/checkpoints/<step>")
    x.add_argument("out_dir", help="where the consolidated safetensors model goes")
    x.set_defaults(func=cmd_export)


def _training_args(p) -> None:
    p.add_argument("recipe", help="TOML recipe, e.g. recipes/tiny.toml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (beat the recipe)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--check", action="store_true",
                   help="validate the launch (config, batch layout for --nproc-per-node x --nnodes, templates) and "
                        "list the local paths it needs as found / not found here; no files or GPU needed")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="launch N processes on this node through torch.distributed.run (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (with --nproc-per-node)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    p.add_argument("--master-addr", default=None, help="address of node 0 (multi-node)")
    p.add_argument("--master-port", type=int, default=29500, help="port on node 0 (multi-node)")


def _config(args):
    """The resolved config, or None when the command is done (--print-config printed it)."""
    from fastebm.config import load_config, to_commented_toml

    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(to_commented_toml(cfg))
        return None
    return cfg


def _check(args, cfg, command: str) -> int:
    from fastebm.cli.check import run_check

    return run_check(cfg, args, command)


def cmd_train(args) -> int:
    cfg = _config(args)
    if cfg is None:
        return 0
    if args.check:
        return _check(args, cfg, "train")
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return launch(args, cfg)
    from fastebm.train.trainer import Trainer

    setup_logging(os.path.expanduser(cfg.run.output_dir))
    trainer = Trainer(cfg)
    log.info("training %s for %d steps -> %s", cfg.model.path or f"tiny {cfg.model.tiny}", trainer.total_steps,
             trainer.run_dir)
    return _run(trainer, cfg)


def cmd_sft(args) -> int:
    cfg = _config(args)
    if cfg is None:
        return 0
    if args.check:
        return _check(args, cfg, "sft")
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return launch(args, cfg)
    from fastebm.train.sft import SFTTrainer

    setup_logging(os.path.expanduser(cfg.run.output_dir))
    trainer = SFTTrainer(cfg)
    return _run(trainer, cfg)


def _run(trainer, cfg) -> int:
    """Train; Ctrl-C saves and exits 130; a failed collective (another rank died or hung) is one line."""
    from fastebm.train.parallel import Dist, destroy_distributed, is_peer_failure

    dist = getattr(trainer, "dist", None) or Dist()
    try:
        trainer.train()
    except KeyboardInterrupt:
        log.warning("stopped at step %d; resume with train.resume=true", trainer.step)
        return 130
    except RuntimeError as e:
        if not (dist.enabled and is_peer_failure(e)):
            raise
        from fastebm.train.checkpoint import latest_checkpoint

        log.debug("collective failure", exc_info=True)
        print(f"fastebm: error: rank {dist.rank}: a collective with the other ranks failed during step "
              f"{trainer.step + 1}: another rank died or hung (the launcher's summary names it; a hang ends after "
              f"parallel.timeout_s = {cfg.parallel.timeout_s:g} s). {str(e).splitlines()[0][:300]}. "
              f"Newest complete checkpoint: {latest_checkpoint(trainer.run_dir) or '(none yet)'}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_distributed(dist)
    log.info("done: %d steps; metrics in %s", trainer.step, trainer.metrics.path)
    if dist.is_main:
        write_run_report(trainer.run_dir)
    return 0


def write_run_report(run_dir: str) -> None:
    """The run's plots and report page (``fastebm report``); plotting never fails a finished run."""
    try:
        from fastebm.eval.report import write_report

        log.info("report: %s", write_report(run_dir))
    except Exception as e:  # a missing font or backend must not turn a good run into an error
        log.warning("could not write the report (%s: %s); try: fastebm report %s", type(e).__name__, e, run_dir)


def launch(args, cfg) -> int:
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
    run += ["-m", "fastebm.cli", args.command, args.recipe, *args.overrides]
    rc = subprocess.call(run)
    if rc != 0:
        print(f"fastebm: error: the distributed job failed (exit status {rc}); the launcher's summary above "
              f"names the failed rank, run.output_dir/train.rank*.log hold each rank's log", file=sys.stderr)
    return rc


def cmd_export(args) -> int:
    from fastebm.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} -> {out} (from_pretrained loads it)")
    return 0
