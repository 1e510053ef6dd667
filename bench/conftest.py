"""Shared helpers for the pytest-benchmark suites (`pytest bench/`).

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

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

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
    run = mod.{factory}(*{args!r})          # builds inputs, returns the call to measure
    run()                                   # warm-up: lazy imports, thread pools
    import gc; gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS:")
    run()
    print(json.dumps({{"peak_growth": status("VmHWM:") - before}}))
""")


def cpu_peak_rss_growth(module_path: str, factory: str, *args) -> int:
    """Peak RSS growth (bytes) of ``module.factory(*args)()`` in a fresh process (see module doc)."""
    code = _PROBE.format(repo=REPO, path=module_path, factory=factory, args=tuple(args))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
