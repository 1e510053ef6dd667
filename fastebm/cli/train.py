"""``fastebm train`` (GRPO), ``fastebm sft`` (CoT-SFT), ``fastebm export`` and ``fastebm convert-checkpoint``.

Both training commands take a recipe and ``section.key=value`` overrides, print the resolved config
with ``--print-config``, check a launch without files or GPUs with ``--check`` (at the world size of
``--nproc-per-node`` x ``--nnodes``; ``fastebm.cli.check``), and with ``--nproc-per-node N`` re-run
themselves under ``torch.distributed.run`` (N processes per node, ``--nnodes`` nodes).

Stop signals under ``--nproc-per-node`` (``launch``): torchrun runs in a session of its own, so a
signal to this command's process group (Ctrl-C in a terminal, ``kill -TERM -PGID``) reaches only
this process, which forwards SIGINT / SIGTERM / SIGUSR1 to every rank (torchrun's children). The
ranks finish the step, save together and report to a status folder
(``FASTEBM_STATUS_DIR``, one file per local rank) with exit 0, so torchrun ends quietly, and this
command exits with their code (75 preempted, 130 Ctrl-C). torchrun itself, if signalled directly
(a scheduler that signals every process of the job), forwards SIGTERM and SIGUSR1 too
(``TORCHELASTIC_SIGNALS_TO_HANDLE``) and waits up to ``parallel.timeout_s`` for the ranks before it
kills them (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``). If this command is killed outright, torchrun gets
SIGTERM (the parent-death signal) and the ranks save on it.
"""
from __future__ import annotations

import logging
import os
import signal
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

    c = sub.add_parser("convert-checkpoint",
                       help="rewrite a TRUSTED checkpoint of fastebm <= 0.1 (pickled trainer_state.pt) in the current "
                            "format, in place")
    c.add_argument("checkpoint", help="run.output_dir/checkpoints/<step>")
    c.add_argument("--trusted", action="store_true",
                   help="required: you know where this checkpoint comes from (converting unpickles it, which runs any "
                        "code it holds)")
    c.set_defaults(func=cmd_convert_checkpoint)


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
    return _train_command(args, "train")


def cmd_sft(args) -> int:
    return _train_command(args, "sft")


def _train_command(args, command: str) -> int:
    """``fastebm train`` / ``fastebm sft``: the config, then ``--check``, the launcher (``--nproc-per-node``
    outside torchrun) or the run itself."""
    cfg = _config(args)
    if cfg is None:
        return 0
    if args.check:
        return _check(args, cfg, command)
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return launch(args, cfg)
    from fastebm.train.stop import install_early_handlers

    setup_logging(os.path.expanduser(cfg.run.output_dir))
    install_early_handlers()  # a preemption signal while the models load is acted on after step 1
    if command == "sft":
        from fastebm.train.sft import SFTTrainer

        trainer = SFTTrainer(cfg)
    else:
        from fastebm.train.trainer import Trainer

        trainer = Trainer(cfg)
        log.info("training %s for %d steps -> %s", cfg.model.path or f"tiny {cfg.model.tiny}", trainer.total_steps,
                 trainer.run_dir)
    return _run(trainer, cfg)


def _run(trainer, cfg) -> int:
    """Train. Ctrl-C saves and exits 130, SIGTERM / SIGUSR1 save and exit 75 (``fastebm.train.stop``); a
    failed collective (another rank died or hung) is one line."""
    from fastebm.train.parallel import Dist, destroy_distributed, is_peer_failure
    from fastebm.train.stop import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted

    dist = getattr(trainer, "dist", None) or Dist()
    try:
        trainer.train()
    except KeyboardInterrupt:
        log.warning("stopped at step %d; resume with train.resume=true", trainer.step)
        return _stopped(EXIT_INTERRUPTED)
    except Preempted as e:
        log.warning("preempted (%s): stopped after step %d with checkpoint %s; resume with train.resume=true "
                    "(exit code %d)", e.signal_name, e.step, e.checkpoint, EXIT_PREEMPTED)
        return _stopped(EXIT_PREEMPTED)
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


STATUS_DIR_ENV = "FASTEBM_STATUS_DIR"


def _stopped(code: int) -> int:
    """A rank launched by ``launch`` that stopped on a signal (and saved) reports ``code`` in the
    status folder and exits 0, so torchrun does not report a failure; ``launch`` exits with it."""
    status_dir = os.environ.get(STATUS_DIR_ENV)
    if not status_dir or "LOCAL_RANK" not in os.environ:
        return code
    with open(os.path.join(status_dir, os.environ["LOCAL_RANK"]), "w") as f:
        f.write(str(code))
    return 0


def launch(args, cfg) -> int:
    """Re-run this command under torch.distributed.run: N processes per node, M nodes.

    Stop signals reach the ranks through this process (module docstring); their exit code comes
    back through the status folder.
    """
    import shutil
    import subprocess
    import tempfile

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
    status_dir = tempfile.mkdtemp(prefix="fastebm-status-")
    env = dict(os.environ, **{STATUS_DIR_ENV: status_dir,
                              "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                              "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(cfg.parallel.timeout_s))})
    proc = subprocess.Popen(run, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    def forward(signum, frame):
        for pid in _children(proc.pid) or [proc.pid]:  # the ranks (torchrun's children); torchrun before they exist
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    previous = {s: signal.signal(s, forward) for s in stop_signals}
    try:
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    codes = []
    for name in os.listdir(status_dir):
        with open(os.path.join(status_dir, name)) as f:
            codes.append(int(f.read().strip() or 1))
    shutil.rmtree(status_dir, ignore_errors=True)
    if len(codes) == args.nproc_per_node and len(set(codes)) == 1:  # every rank stopped on a signal and saved
        return codes[0]
    if rc != 0:
        print(f"fastebm: error: the distributed job failed (exit status {rc}); the launcher's summary above "
              f"names the failed rank, run.output_dir/train.rank*.log hold each rank's log", file=sys.stderr)
    return rc


def _die_with_parent() -> None:
    """In torchrun's process, before exec: SIGTERM when this launcher dies (Linux prctl PR_SET_PDEATHSIG),
    so that the ranks still get a signal to save on if the launcher is killed outright."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _children(pid: int) -> list[int]:
    """Pids of ``pid``'s child processes (Linux /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(name))
    return out


def cmd_export(args) -> int:
    from fastebm.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} -> {out} (from_pretrained loads it)")
    return 0


def cmd_convert_checkpoint(args) -> int:
    from fastebm.train.checkpoint import CheckpointError, convert_legacy_checkpoint

    if not args.trusted:
        raise CheckpointError(f"{args.checkpoint}: converting unpickles its trainer_state.pt and rng/*.pt, which runs "
                              f"any code they hold: only for a checkpoint you trust (your own run); then add --trusted")
    changed = convert_legacy_checkpoint(os.path.expanduser(args.checkpoint))
    print(f"converted {args.checkpoint}: {', '.join(changed) or 'meta.json'} rewritten as JSON + safetensors, "
          f"with checksums in meta.json")
    return 0
