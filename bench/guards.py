"""Ratio guards: fastebm's speed and memory claims checked against its own references in one run.

    python -m pytest bench/ -m quick       # only the guards (under two minutes on 2 CPU cores)

A guard times fastebm and a reference side by side in the same process, interleaved (A, B, A, B, ...:
whatever the machine is doing at the moment hits both), and summarises the rounds by the median of
the per-round ratios reference / fastebm, so one slow round on a shared machine moves nothing. The
ratio is compared with an "at least" floor of the machine's device class from ``bench/floors.toml``:

    [cpu]
    # measured on ..., median 3.2x over 3 runs
    train_step_speedup_vs_release = 2.0

A ratio below its floor fails, naming the guard, the floor and the value; a device class without a
floor for a guard (a GPU nobody has measured yet) is reported, not failed. Counting guards (decodes
per clip) are exact: the value must equal the expected number on every device.

This module does no timing of its own beyond ``interleave`` (whose clock is a parameter), so
``tests/test_bench_guards.py`` checks the comparison, the floors file and the result writer with
made-up numbers. The pytest side (options, the session's recorder, the summary) is
``bench/conftest.py``.
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import statistics
import subprocess
import time
import tomllib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
FLOORS_FILE = os.path.join(HERE, "floors.toml")
RESULTS_DIR = os.path.join(HERE, "results")

# Every guard: name -> what its number means. Floors name these keys; the bench files check them by name.
GUARDS: dict[str, str] = {
    "fused_loss_speedup_vs_liger_chunked":
        "fused-linear GRPO loss fwd+bwd (grpo.kernel): Liger's chunked loss time / fastebm time",
    "fused_loss_logits_memory_multiple":
        "full fp32 logits (B*T*V*4 bytes) / fastebm loss fwd+bwd peak memory growth",
    "scoring_logprobs_speedup_vs_eager":
        "token log-probs of the scoring pass (grpo.kernel): PyTorch eager (full logits) time / fastebm time",
    "prefix_rollout_speedup":
        "rollout at prefix 16x the completion, G = 8 (rollout.shared_prefix): repeated time / fastebm time",
    "prefix_scoring_speedup":
        "scoring pass at prefix 16x the completion, G = 8 (rollout.shared_prefix): repeated time / fastebm time",
    "prefix_training_speedup":
        "training fwd+bwd at prefix 16x the completion, G = 8 (rollout.shared_prefix): repeated time / fastebm time",
    "rewards_speedup_vs_sequential":
        "all four rewards, G = 8: the reference-style sequential loop time / fastebm's batched time",
    "train_step_speedup_vs_release":
        "tiny train step, G = 8: release-style step (repeated prefix, eager loss, sequential PCG) time / fastebm time",
    "video_decodes_per_clip_per_step":
        "decodes of each clip in the steps that used it / those steps (exact: 1)",
    "video_cache_hit_fraction_second_epoch":
        "second epoch: cache hits / clip loads (video.cache_dir; exact: 1)",
}

# Exact guards (counts): the value each must have on every device; they take no floor.
EXACT: dict[str, float] = {"video_decodes_per_clip_per_step": 1.0, "video_cache_hit_fraction_second_epoch": 1.0}

# The result file's columns, in order (one row per measured provider and one per guard ratio).
FIELDS = ("op", "provider", "shape", "metric", "value", "ratio", "floor", "device", "commit")


class FloorsError(ValueError):
    """bench/floors.toml is malformed; the message names the file and the entry."""


# ----------------------------------------------------------------------------------- floors --- #

def device_class(torch_module=None) -> str:
    """``cpu``, or ``cuda-sm<major><minor>`` of the current CUDA device (``cuda-sm90`` for H100/H200)."""
    if torch_module is None:
        import torch as torch_module
    if not torch_module.cuda.is_available():
        return "cpu"
    major, minor = torch_module.cuda.get_device_capability()
    return f"cuda-sm{major}{minor}"


def load_floors(path: str = FLOORS_FILE) -> dict[str, dict[str, float]]:
    """``{device class: {guard: floor}}`` from a TOML file with one table per device class.

    Every entry must name a guard of ``GUARDS`` and be a number > 0; exact guards take no floor.
    """
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise FloorsError(f"{path}: floors file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise FloorsError(f"{path}: not valid TOML: {e}") from None
    out: dict[str, dict[str, float]] = {}
    for dev, entries in table.items():
        if not isinstance(entries, dict):
            raise FloorsError(f"{path}: {dev!r} must be a table of floors ([{dev}]), got {type(entries).__name__}")
        out[dev] = {}
        for name, floor in entries.items():
            where = f"{path}: [{dev}] {name}"
            if name not in GUARDS:
                raise FloorsError(f"{where}: unknown guard (known: {', '.join(sorted(GUARDS))})")
            if name in EXACT:
                raise FloorsError(f"{where}: an exact guard (must equal {EXACT[name]:g} everywhere) takes no floor")
            if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) \
                    or floor <= 0:
                raise FloorsError(f"{where}: a floor must be a finite number > 0, got {floor!r}")
            out[dev][name] = float(floor)
    return out



# ---------------------------------------------------------------------------------- verdicts --- #

@dataclass(frozen=True)
class Verdict:
    """The outcome of one guard."""
    name: str
    value: float                 # the guarded ratio (or the exact guard's count)
    floor: Optional[float]       # the floor (exact guards: the required value); None: no floor for this device
    device: str
    status: str                  # "pass" | "fail" | "no floor"

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    @property
    def message(self) -> str:
        if self.name in EXACT:
            rel = "==" if self.status == "pass" else "!="
            return f"{self.name} = {self.value:.4g} {rel} {self.floor:g} (exact) [{self.device}] {self.status}"
        if self.floor is None:
            return (f"{self.name} = {self.value:.3f}x; no floor for device class {self.device!r} in "
                    f"bench/floors.toml (reported, not checked)")
        rel = ">=" if self.status == "pass" else "<"
        return f"{self.name} = {self.value:.3f}x {rel} floor {self.floor:g}x [{self.device}] {self.status}"


def judge(name: str, value: float, floors: dict[str, dict[str, float]], device: str) -> Verdict:
    """Compare a guard's measured value with its floor for ``device`` (or its exact value).

    A NaN ratio fails: it means a measurement broke, not that the machine was noisy.
    """
    if name not in GUARDS:
        raise KeyError(f"unknown guard {name!r} (known: {', '.join(sorted(GUARDS))})")
    if name in EXACT:
        want = EXACT[name]
        return Verdict(name, value, want, device, "pass" if value == want else "fail")
    floor = floors.get(device, {}).get(name)
    if floor is None:
        return Verdict(name, value, None, device, "no floor")
    return Verdict(name, value, floor, device, "pass" if value >= floor else "fail")


class GuardFailure(AssertionError):
    """Guards below their floors; the message has one line per failed guard (name, value, floor)."""


def enforce(verdicts: Sequence[Verdict]) -> None:
    """Raise ``GuardFailure`` naming every failed guard; guards without a floor only report."""
    failed = [v.message for v in verdicts if v.failed]
    if failed:
        raise GuardFailure("\n".join(failed))


def check_rows(rows: Sequence[dict], floors: dict[str, dict[str, float]], device: Optional[str] = None) -> list[Verdict]:
    """Judge the guard rows of a result set (``read_results`` rows, or dicts with the same keys) against
    ``floors``: rows whose ``metric`` is a guard name; ``device`` defaults to each row's own.

    Re-checks an old result file against today's floors, and lets the tests feed the guard logic
    made-up results without timing anything.
    """
    out = []
    for r in rows:
        if r["metric"] in GUARDS:
            out.append(judge(r["metric"], float(r["ratio"] if r.get("ratio") not in (None, "") else r["value"]),
                             floors, device or r["device"]))
    return out


def summary(verdicts: Sequence[Verdict]) -> str:
    """One line per guard: name, value, floor, status (the bench's terminal summary)."""
    lines = []
    for v in verdicts:
        floor = "-" if v.floor is None else (f"== {v.floor:g}" if v.name in EXACT else f">= {v.floor:g}")
        value = f"{v.value:.4g}" if v.name in EXACT else f"{v.value:.3f}x"
        lines.append(f"{v.name:<40} {value:>9}  {floor:<8} [{v.device}] {v.status}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- timing --- #

def interleave(calls: Sequence[Callable[[], object]], rounds: int, warmup: int = 1,
               clock: Callable[[], float] = time.perf_counter,
               after: Optional[Callable[[int], None]] = None) -> list[list[float]]:
    """Run ``calls`` in turn, ``rounds`` times (A, B, A, B, ...), after ``warmup`` untimed turns.

    Returns one list of ``rounds`` durations per call. ``after(i)`` runs after call i each turn,
    outside the timed region (to restore state the call changed).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    times: list[list[float]] = [[] for _ in calls]
    for r in range(warmup + rounds):
        for i, call in enumerate(calls):
            t0 = clock()
            call()
            dt = clock() - t0
            if after is not None:
                after(i)
            if r >= warmup:
                times[i].append(dt)
    return times


def median_ratio(reference: Sequence[float], fastebm: Sequence[float]) -> float:
    """Median over rounds of reference_i / fastebm_i (the speed-up; > 1 when fastebm is faster)."""
    if len(reference) != len(fastebm) or not reference:
        raise ValueError(f"need the same number (>= 1) of rounds on both sides, got {len(reference)} and {len(fastebm)}")
    if any(t <= 0 for t in fastebm):
        raise ValueError(f"fastebm durations must be > 0, got {list(fastebm)}")
    return statistics.median(r / f for r, f in zip(reference, fastebm))


# ---------------------------------------------------------------------------------- results --- #

def git_commit(repo: str = os.path.dirname(HERE)) -> str:
    """Short HEAD hash of ``repo``, with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def result_path(results_dir: str, device: str, commit: str, now: Optional[datetime.datetime] = None) -> str:
    """``<results_dir>/<UTC time>_<device>_<commit>.csv``: one new file per run, sortable by time."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return os.path.join(results_dir, f"{now:%Y%m%dT%H%M%SZ}_{device}_{commit}.csv")


class ResultWriter:
    """Appends rows with the fixed columns ``FIELDS`` to one CSV; the file (and its header) is made at
    the first row, so a run that measures nothing leaves no file."""

    def __init__(self, path: str):
        self.path = path

    def write(self, **row) -> None:
        missing = [k for k in ("op", "provider", "metric", "value") if row.get(k) in (None, "")]
        unknown = sorted(set(row) - set(FIELDS))
        if missing or unknown:
            raise ValueError(f"result row: missing {missing}, unknown columns {unknown} (columns: {FIELDS})")
        new = not os.path.exists(self.path)
        if new:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: _cell(row.get(k)) for k in FIELDS})


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def read_results(path: str) -> list[dict]:
    """The rows of a result file (strings; empty cells ''), checking the header is ``FIELDS``."""
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        if tuple(r.fieldnames or ()) != FIELDS:
            raise ValueError(f"{path}: columns {r.fieldnames}, expected {list(FIELDS)}")
        return list(r)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python bench/guards.py RESULT.csv ...``: judge saved result files against today's floors."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("files", nargs="+", help="result files (bench/results/*.csv)")
    ap.add_argument("--floors", default=FLOORS_FILE, help="floors file (default: bench/floors.toml)")
    args = ap.parse_args(argv)
    floors = load_floors(args.floors)
    failed = False
    for path in args.files:
        verdicts = check_rows(read_results(path), floors)
        print(f"{path}\n{summary(verdicts)}")
        failed |= any(v.failed for v in verdicts)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
