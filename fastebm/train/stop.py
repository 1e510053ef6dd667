"""How a run stops: the signals the training loop answers, and the exit codes of ``fastebm train`` / ``sft``.

Exit codes (docs/reliability.md has the table with what to do for each):

====  ====================================================================================
0     done: every step ran and the final checkpoint is saved
1     stopped by an error (TrainingError / CheckpointError, a failed collective); the message
      names the newest good checkpoint
2     bad recipe, override, data or command line (ConfigError / DataError); nothing trained
3     the run folder is in use by another live run (``fastebm.lock``); nothing written
75    preempted: SIGTERM or SIGUSR1 arrived; the step finished, a checkpoint of it is saved;
      resume with ``train.resume=true`` (75 is EX_TEMPFAIL: "try again later"). One that
      arrives while the run starts is acted on after the first step
130   Ctrl-C (SIGINT): the step finished and a checkpoint of it is saved
143   under torchrun, SIGTERM outside the training steps (start-up, shutdown): nothing to save
====  ====================================================================================

``StopSignals`` is installed by the loop for its duration (then the previous handlers come back):
SIGINT, SIGTERM and SIGUSR1 only set a flag, and the loop stops after the step it is in, on every
rank together (one all-reduce per step). A second Ctrl-C raises KeyboardInterrupt at once. A second
SIGTERM / SIGUSR1 changes nothing: under torchrun a rank may receive the scheduler's signal and
the launcher's copy of it, and must still finish the step.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Optional

log = logging.getLogger("fastebm")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_RUN_DIR_IN_USE = 3
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
EXIT_KILLED = 143

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The loop stopped on SIGTERM / SIGUSR1 after saving ``checkpoint`` (the CLI exits 75)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Optional[str]):
        super().__init__(f"{signal_name}: stopped after step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


_early_stop: Optional[str] = None  # a SIGTERM / SIGUSR1 that arrived before the loop (install_early_handlers)


def install_early_handlers() -> None:
    """Remember a SIGUSR1 (and, on one process, a SIGTERM) that arrives while the run is starting, for
    the loop to act on after its first step. The CLI calls it before building the trainer; without
    it a SIGUSR1 at start-up would kill the process (its default action). Under torchrun a SIGTERM
    at start-up keeps exiting at once (``parallel._on_sigterm``: a launcher stopping the job)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGUSR1, _on_early)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_early)


def _on_early(signum, frame):
    global _early_stop
    _early_stop = _early_stop or signal.Signals(signum).name
    log.warning("%s while starting: the run will save and stop after its first step", _early_stop)


class StopSignals:
    """Context manager: while inside, SIGINT / SIGTERM / SIGUSR1 ask the loop to stop after the step.

    ``interrupted`` (Ctrl-C) and ``preempted`` (the name of the first SIGTERM / SIGUSR1, or None) are
    read by the loop after each step. Outside the main thread (where Python cannot set handlers)
    nothing is installed.
    """

    def __init__(self, current_step: Callable[[], int]):
        self.current_step = current_step
        self.interrupted = False
        self.preempted: Optional[str] = None
        self._prev: dict = {}

    def __enter__(self) -> "StopSignals":
        self.preempted = _early_stop
        if threading.current_thread() is threading.main_thread():
            self._prev[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
            for s in PREEMPT_SIGNALS:
                self._prev[s] = signal.signal(s, self._on_preempt)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h)
        self._prev.clear()

    def _on_interrupt(self, signum, frame):
        if self.interrupted:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True
        log.warning("Ctrl-C: finishing step %d, then saving and exiting (press again to abort)",
                    self.current_step() + 1)

    def _on_preempt(self, signum, frame):
        name = signal.Signals(signum).name
        if self.preempted is not None:
            log.warning("%s: already stopping after step %d", name, self.current_step() + 1)
            return
        self.preempted = name
        log.warning("%s: finishing step %d, then saving a checkpoint and exiting (exit code %d). If another rank "
                    "died instead, the next collective fails and this rank stops without saving", name,
                    self.current_step() + 1, EXIT_PREEMPTED)
