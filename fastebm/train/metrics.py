"""Per-step metrics: ``metrics.jsonl`` (one JSON object per step) and, optionally, TensorBoard."""
from __future__ import annotations

import json
import math
import os
from typing import Optional


class MetricsWriter:
    def __init__(self, run_dir: str, tensorboard: bool = False, resume_step: Optional[int] = None,
                 enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled  # False on ranks other than 0: the metrics are reduced, rank 0 writes them
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(self.path):
            # A resumed run rewrites the steps after its checkpoint: drop them so each step appears once.
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.isfile(self.path):
            os.replace(self.path, self.path + ".old")  # a fresh run never appends to an older one
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("log.tensorboard = true needs the tensorboard package: "
                                   "pip install 'fastebm[tensorboard]'") from e
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def append_skipped(path: str, step: int, entry: dict) -> None:
    """One line of ``skipped.jsonl``: the step, the file, the record and the reason."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **entry}, default=str) + "\n")


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
