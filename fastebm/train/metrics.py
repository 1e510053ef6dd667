"""Per-step metrics: what a GRPO step reports (``step_metrics``), written to ``metrics.jsonl`` (one
JSON object per step) and, optionally, TensorBoard (``MetricsWriter``).

Each row is one ``write`` of one line, flushed at once, so a crash leaves at most the last line torn.
Reading (a resume, ``read_metrics``) drops a torn last line with a warning; a damaged line elsewhere
is an error naming the file and the line.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
from typing import Mapping, Optional

from fastebm.data import DataError


def step_metrics(step: int, *, rewards: Mapping[str, list[float]], weights: Mapping[str, float], group_size: int,
                 reward_errors: Mapping[str, int], advantages: list[float], lengths: list[int], truncated: list[bool],
                 prefix_tokens: int, update: dict, times: dict, samples_skipped: int, profiles_missing: int) -> dict:
    """One GRPO step's metrics row, from the whole (all ranks') batch.

    ``rewards``: per reward, one value per completion (prompt-major, ``group_size`` per prompt);
    ``update``: the optimiser pass's numbers (loss, kl, clip_ratio, grad_norm, lr, ...); ``times``:
    ``time/*`` seconds. Per reward: the mean, the mean within-group std and the error count.
    """
    n = len(lengths)
    total = [sum(weights[k] * rewards[k][i] for k in rewards) for i in range(n)]
    m = {"step": step, **update, "reward/total": _mean(total)}
    for name, vals in rewards.items():
        m[f"reward/{name}"] = _mean(vals)
        groups = [vals[i:i + group_size] for i in range(0, len(vals), group_size)]
        m[f"reward/{name}_std"] = _mean([statistics.stdev(g) for g in groups]) if group_size > 1 else 0.0
        m[f"reward/{name}_errors"] = reward_errors.get(name, 0)
    m.update({
        "adv/std": statistics.stdev(advantages) if len(advantages) > 1 else 0.0,
        "tokens/prefix": prefix_tokens,
        "tokens/completion": sum(lengths),
        "completion/mean_len": sum(lengths) / max(1, n),
        "completion/truncated_frac": sum(truncated) / max(1, n),
        **times,
        "samples_skipped": samples_skipped,
        "profiles_missing": profiles_missing,
    })
    return m


def _mean(xs) -> float:
    return math.fsum(xs) / len(xs) if len(xs) else 0.0


class MetricsWriter:
    def __init__(self, run_dir: str, tensorboard: bool = False, resume_step: Optional[int] = None,
                 enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled  # False on ranks other than 0: the metrics are reduced, rank 0 writes them
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(self.path):
            # A resumed run rewrites the steps after its checkpoint: drop them so each step appears once
            # (and a torn last line), then replace the file whole (a crash here leaves the old one).
            try:
                rows = read_metrics_file(self.path)
            except ValueError as e:
                raise DataError(f"{e}: repair or move the file to resume") from None
            keep = [json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
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
            f.write(json.dumps(row) + "\n")  # one write, flushed on close: a crash tears at most this line
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
    """The rows of ``run_dir/metrics.jsonl`` (``read_metrics_file``)."""
    return read_metrics_file(os.path.join(run_dir, "metrics.jsonl"))


def read_metrics_file(path: str) -> list[dict]:
    """The rows of a metrics.jsonl. A last line that is not valid JSON (torn by a crash mid-write) is
    dropped with a warning; a bad line before it is a ValueError naming the file and the line."""
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    numbered = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
    for i, (n, ln) in enumerate(numbered):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(numbered) - 1:
                logging.getLogger("fastebm").warning("%s: line %d is incomplete (the run stopped while writing it): "
                                                     "dropped", path, n)
                break
            raise ValueError(f"{path}: line {n}: not a JSON object of metrics ({e})") from None
        rows.append(row)
    return rows
