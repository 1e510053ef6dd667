"""The training loop every trainer runs: steps, periodic checkpoints, stop signals, the progress bar.

    history = train_loop(trainer, trainer.total_steps, cfg.train.checkpoint_every,   # train.steps or train.epochs
                         Progress(trainer.total_steps, trainer.step, cfg.log.progress, describe))

``trainer`` is anything with ``step`` (steps done), ``train_step() -> metrics``, ``save()``,
``checkpointer`` (``fastebm.train.builders.Checkpointer``), ``dist``
(``fastebm.train.parallel.Dist``) and ``close()``: the GRPO ``Trainer`` and the ``SFTTrainer``.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Protocol

from fastebm.train.checkpoint import CheckpointWriteError
from fastebm.train.parallel import Dist
from fastebm.train.stop import Preempted, StopSignals

log = logging.getLogger("fastebm")


class Steppable(Protocol):
    step: int
    dist: Dist
    checkpointer: "object"  # fastebm.train.builders.Checkpointer (builders imports this module's siblings)

    def train_step(self) -> dict: ...

    def save(self) -> str: ...

    def close(self) -> None: ...


def train_loop(trainer: Steppable, steps: int, checkpoint_every: int, progress: "Progress") -> list[dict]:
    """Run ``trainer.train_step()`` until ``trainer.step == steps``; returns the steps' metrics.

    After each step: the weights must be finite (else TrainingError naming the step and the last
    good checkpoint, nothing saved), then the stop flags are agreed over the ranks (one all-reduce,
    so every rank stops after the same step), then the periodic checkpoint.

    - Ctrl-C (SIGINT) finishes the step, saves and raises KeyboardInterrupt (the CLI exits 130); a
      second Ctrl-C raises at once.
    - SIGTERM / SIGUSR1 (preemption) finish the step, save and raise ``Preempted`` (exit 75).
    - A periodic checkpoint that cannot be written (disk full, folder not writable) is a warning and
      the run goes on (the next one is tried); the final one, or one on a stop signal, raises
      CheckpointWriteError naming the last good checkpoint.

    The trainer is closed however the loop ends.
    """
    history = []
    with StopSignals(lambda: trainer.step) as stop:
        try:
            while trainer.step < steps:
                m = trainer.train_step()
                history.append(m)
                progress.update(trainer.step, m)
                trainer.checkpointer.check_finite(trainer.step)
                interrupted, preempted = trainer.dist.all_reduce_sum(float(stop.interrupted),
                                                                     float(stop.preempted is not None))
                if preempted:  # every rank stops after the same step
                    name = stop.preempted or "SIGTERM (on another rank)"
                    log.warning("%s: saving a checkpoint of step %d and stopping", name, trainer.step)
                    raise Preempted(name, trainer.step, trainer.save())
                if interrupted:
                    stop.interrupted = True
                    log.warning("interrupted: saving a checkpoint at step %d and stopping", trainer.step)
                    trainer.save()
                    raise KeyboardInterrupt
                if checkpoint_every and trainer.step % checkpoint_every == 0 and trainer.step < steps:
                    _periodic_save(trainer)
            trainer.save()
        finally:
            progress.close()
            trainer.close()
    return history


def _periodic_save(trainer: Steppable) -> None:
    """A periodic checkpoint; one that cannot be written costs a warning, not the run."""
    try:
        trainer.save()
    except CheckpointWriteError as e:
        log.warning("%s; training goes on and the next checkpoint is tried again", e)


class Progress:
    """A rich progress bar with ETA, or one log line per step when disabled / not a terminal.

    ``describe(metrics)`` is the text shown for a step (each trainer shows its own numbers).
    """

    def __init__(self, total: int, start: int, enabled: bool, describe: Callable[[dict], str]):
        self.describe = describe
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, m: dict) -> None:
        info = self.describe(m)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            log.info("step %d: %s", step, info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
