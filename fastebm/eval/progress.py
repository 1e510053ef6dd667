"""A progress bar with ETA for the evaluation commands (rich on a terminal, else a log line per update)."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("fastebm")


class Progress:
    """``Progress(total, desc)``; ``advance(n, info="")``; ``close()``. Items already done before
    this run (a resumed output) are not counted in ``total``, so the ETA is this run's."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.done = total, desc, 0
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty() and total > 0:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn(desc), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                    TimeRemainingColumn())
            self.task = self.bar.add_task(desc, total=total, info="")
            self.bar.start()

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n, info=info)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        log.info("%s: %d/%d  %s elapsed %.0fs, ETA %.0fs", self.desc, self.done, self.total, info, elapsed, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
