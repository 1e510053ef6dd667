"""The training loop every trainer runs: steps, periodic checkpoints, Ctrl-C, the progress bar.

    history = train_loop(trainer, trainer.total_steps, cfg.train.checkpoint_every,   # train.steps or train.epochs
                         Progress(trainer.total_steps, trainer.step, cfg.log.progress, describe))

``trainer`` is anything with ``step`` (steps done), ``train_step() -> metrics``, ``save()``,
``dist`` (``fastebm.train.parallel.Dist``) and ``close()``: the GRPO ``Trainer`` and the
``SFTTrainer``.
"""
from __future__ import annotations

import logging
import signal
import sys
from typing import Callable, Protocol

from fastebm.train.parallel import Dist

log = logging.getLogger("fastebm")


class Steppable(Protocol):
    step: int
    dist: Dist

    def train_step(self) -> dict: ...

    def save(self) -> str: ...

    def close(self) -> None: ...


def train_loop(trainer: Steppable, steps: int, checkpoint_every: int, progress: "Progress") -> list[dict]:
    """Run ``trainer.train_step()`` until ``trainer.step == steps``; returns the steps' metrics.

    A checkpoint every ``checkpoint_every`` steps (0: none) and one at the end. Ctrl-C (SIGINT)
    finishes the current step, saves and raises KeyboardInterrupt (the CLI exits 130); a second
    Ctrl-C raises at once. The stop is agreed over the ranks after each step (one all-reduce), so
    every rank saves the same step. The trainer is closed however the loop ends.
    """
    history = []
    stop = _CtrlC(lambda: trainer.step)
    prev_handler = signal.signal(signal.SIGINT, stop.handle)
    try:
        while trainer.step < steps:
            m = trainer.train_step()
            history.append(m)
            progress.update(trainer.step, m)
            if checkpoint_every and trainer.step % checkpoint_every == 0 and trainer.step < steps:
                trainer.save()
            if trainer.dist.any(stop.requested):  # every rank stops after the same step
                stop.requested = True
                log.warning("interrupted: saving a checkpoint at step %d and stopping", trainer.step)
                trainer.save()
                raise KeyboardInterrupt
        trainer.save()
    finally:
        progress.close()
        signal.signal(signal.SIGINT, prev_handler)
        trainer.close()
    return history


class _CtrlC:
    """The SIGINT handler: the first Ctrl-C asks the loop to stop after the step, the second stops now."""

    def __init__(self, current_step: Callable[[], int]):
        self.current_step = current_step
        self.requested = False

    def handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing step %d, then saving and exiting (press again to abort)",
                    self.current_step() + 1)


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
