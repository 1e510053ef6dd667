"""Shared helpers for the pytest-benchmark suites (`pytest bench/`) and the ratio guards.

    python -m pytest bench/                   # every benchmark and every guard (~5 minutes on 2 CPU cores)
    python -m pytest bench/ -m quick          # the guards only (under two minutes)
    python -m pytest bench/ -m quick --fastebm-set rollout.shared_prefix=false   # a regression, on purpose

Guards (``@pytest.mark.quick``, fixture ``guard``) time fastebm against its reference interleaved in
this process and compare the median per-round ratio with ``bench/floors.toml`` (``bench/guards.py``).
The "fastebm" side of every guard is built from ``bench_config()``: the tiny recipe plus the
overrides of ``--fastebm-set KEY=VALUE`` (repeatable) and of the environment variable
``FASTEBM_BENCH_SET`` ("KEY=VALUE KEY=VALUE"), e.g. ``rollout.shared_prefix=false`` or
``grpo.kernel=eager``; the reference side ignores them. Each run appends its rows to one new CSV
under ``bench/results/`` (``FASTEBM_BENCH_RESULTS`` names another folder) and prints every guard's
value and floor at the end.

Timing is pytest-benchmark's. Peak memory is measured two ways, stated in every result's
``extra_info["mem_method"]``:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the call (the caching allocator's view: what the op itself needed).
- CPU: peak RSS growth of a fresh subprocess. It builds the inputs, resets the kernel's peak-RSS
  counter (``echo 5 > /proc/self/clear_refs``), runs the call once and reports ``VmHWM`` minus the
  ``VmRSS`` before the call. ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc return every large block
  to the OS on free, so the RSS follows the live tensors instead of malloc's cache.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import textwrap
from typing import Callable, Optional

import pytest
import torch

from guards import (RESULTS_DIR, ResultWriter, device_class, git_commit, interleave, judge, load_floors, median_ratio,
                    result_path, summary)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def cuda_peak_growth(fn) -> int:
    """Bytes the call needed beyond what was allocated before it (CUDA caching allocator)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


_PROBE = textwrap.dedent("""
    import importlib.util, json, os, sys
    import torch
    sys.path[:0] = [{repo!r}, os.path.dirname({path!r})]
    spec = importlib.util.spec_from_file_location("bench_mod", {path!r})
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    if {threads!r}:
        torch.set_num_threads({threads!r})
    run = mod.{factory}(*{args!r})          # builds inputs, returns the call to measure
    run()                                   # warm-up: lazy imports, thread pools
    import gc; gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS:")
    run()
    print(json.dumps({{"peak_growth": status("VmHWM:") - before}}))
""")


def cpu_peak_rss_growth(module_path: str, factory: str, *args, threads: int = 0) -> int:
    """Peak RSS growth (bytes) of ``module.factory(*args)()`` in a fresh process (see module doc);
    ``threads`` > 0 sets its torch thread count (the guards use one, as when they time)."""
    code = _PROBE.format(repo=REPO, path=module_path, factory=factory, args=tuple(args), threads=threads)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]


# ------------------------------------------------------------------------------------ guards --- #

SET_ENV = "FASTEBM_BENCH_SET"
TINY_RECIPE = os.path.join(REPO, "recipes", "tiny.toml")


def pytest_addoption(parser):
    parser.addoption("--fastebm-set", action="append", default=[], metavar="KEY=VALUE",
                     help=f"config override for the fastebm side of the bench guards (repeatable; also ${SET_ENV})")


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: a ratio guard (python -m pytest bench/ -m quick runs only these)")
    extra = config.getoption("--fastebm-set", default=[]) or []
    if extra:  # through the environment, so the memory probes' subprocesses see the same overrides
        os.environ[SET_ENV] = " ".join([os.environ.get(SET_ENV, ""), *map(shlex.quote, extra)]).strip()


def bench_overrides() -> list[str]:
    """The user's overrides of the fastebm side (``--fastebm-set`` / ``$FASTEBM_BENCH_SET``)."""
    return shlex.split(os.environ.get(SET_ENV, ""))


class BenchCache:
    """One folder for the session's tiny models and sample data (built once, by the first bench that
    needs them); ``overrides`` points a config at it."""

    def __init__(self, root):
        self.models, self.sample = root / "models", root / "sample"
        self.overrides = [f"model.tiny_cache_dir={self.models}", f"data.sample_dir={self.sample}"]


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory) -> BenchCache:
    return BenchCache(tmp_path_factory.mktemp("bench_cache"))


def guard_threads() -> int:
    """Torch threads the guards use on the CPU (``$FASTEBM_BENCH_THREADS``, default 1; 0: torch's own)."""
    return 0 if HAS_CUDA else int(os.environ.get("FASTEBM_BENCH_THREADS", "1"))


@contextlib.contextmanager
def timing_threads():
    """On the CPU, guards time with ``$FASTEBM_BENCH_THREADS`` torch threads (default 1; 0 keeps torch's).

    On a shared 2-core machine a second OpenMP thread turns the neighbours' load into barrier waits,
    and those hit code made of many small ops (the chunked kernels, the decode loop) several times
    harder than code made of a few large ones: under load the scoring guard read 0.66x with two
    threads and 2.6x with one, in the same minute. One thread keeps the ratio about fastebm.
    """
    n = guard_threads()
    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def bench_config(*base: str):
    """The fastebm side's Config: the tiny recipe, then ``base`` (the guard's own settings), then the
    user's overrides (so ``rollout.shared_prefix=false`` wins over everything)."""
    from fastebm.config import load_config

    return load_config(TINY_RECIPE, [*base, *bench_overrides()])


class GuardRecorder:
    """The session's guards: floors of this device class, the run's result file, the verdicts."""

    def __init__(self):
        self.floors = load_floors()
        self.device = device_class()
        self.commit = git_commit()
        results = os.environ.get("FASTEBM_BENCH_RESULTS") or RESULTS_DIR
        self.writer = ResultWriter(result_path(results, self.device, self.commit))
        self.verdicts = []

    def row(self, op: str, provider: str, shape: str, metric: str, value: float) -> None:
        """A measurement that is not a guard ratio (an absolute time, bytes, a count)."""
        self.writer.write(op=op, provider=provider, shape=shape, metric=metric, value=value, device=self.device,
                          commit=self.commit)

    def check(self, name: str, value: float, *, op: str, provider: str, shape: str) -> None:
        """Record the guard ``name``'s value (a row with its floor) and fail the test below the floor."""
        v = judge(name, value, self.floors, self.device)
        self.writer.write(op=op, provider=provider, shape=shape, metric=name, value=value, ratio=value, floor=v.floor,
                          device=self.device, commit=self.commit)
        self.verdicts.append(v)
        print(f"\nguard {v.message}")
        if v.failed:
            pytest.fail(f"guard {v.message} (overrides of the fastebm side: {' '.join(bench_overrides()) or 'none'})",
                        pytrace=False)

    def speedup(self, name: str, *, op: str, shape: str, reference: tuple[str, Callable], fastebm: tuple[str, Callable],
                rounds: int, warmup: int = 1, after: Optional[Callable[[int], None]] = None) -> float:
        """Time ``reference`` and ``fastebm`` (provider name, no-argument call) interleaved, record
        each side's median time and guard the median of the per-round ratios reference / fastebm.

        ``after(i)`` runs after side i (0: reference, 1: fastebm) each round, untimed.
        """
        with timing_threads():
            times = interleave([reference[1], fastebm[1]], rounds, warmup, after=after)
        for (provider, _), t in zip((reference, fastebm), times):
            self.row(op, provider, shape, "median_time_s", statistics.median(t))
        ratio = median_ratio(times[0], times[1])
        print(f"\n{name}: per-round {reference[0]} / {fastebm[0]} = "
              + " ".join(f"{r / f:.2f}" for r, f in zip(*times)))
        self.check(name, ratio, op=op, provider=f"{fastebm[0]}/{reference[0]}", shape=shape)
        return ratio


_RECORDER: list = []  # the session's recorder, for pytest_terminal_summary


@pytest.fixture(scope="session")
def guard() -> GuardRecorder:
    """The ratio guards' recorder (``speedup``, ``check``, ``row``); made when the first guard runs."""
    if not _RECORDER:
        _RECORDER.append(GuardRecorder())
    return _RECORDER[0]


def pytest_terminal_summary(terminalreporter):
    if not _RECORDER or not _RECORDER[0].verdicts:
        return
    rec = _RECORDER[0]
    tr = terminalreporter
    tr.section("fastebm bench guards")
    tr.write_line(f"device class {rec.device}, commit {rec.commit}, overrides of the fastebm side: "
                  f"{' '.join(bench_overrides()) or 'none'}")
    tr.write_line(summary(rec.verdicts))
    if os.path.exists(rec.writer.path):
        path = rec.writer.path
        tr.write_line(f"results: {os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path}")
