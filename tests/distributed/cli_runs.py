"""Running ``python -m fastebm.cli train | sft`` as real subprocesses (``--nproc-per-node N``: torchrun on
gloo) for the distributed tier, and comparing their per-step metrics."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3


def clean_env() -> dict:
    """This environment without a parent torchrun's rank variables, one OpenMP thread per process, and
    the checkout first on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def run_cli(command: str, recipe: str, cache: dict, out, *overrides, nproc: int = 1, timeout: int = 400) -> list:
    """``fastebm COMMAND RECIPE`` for STEPS steps with a checkpoint at every step (all kept), the tiny
    models and sample data from ``cache``; must succeed; returns its metrics.jsonl rows."""
    cmd = [sys.executable, "-m", "fastebm.cli", command, recipe]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    cmd += [f"run.output_dir={out}", f"model.tiny_cache_dir={cache['models']}", f"data.sample_dir={cache['data']}",
            "log.progress=false", f"train.steps={STEPS}", "train.checkpoint_every=1", "train.keep_checkpoints=0",
            *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=clean_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl")) if ln.strip()]


def assert_same_step(a: dict, b: dict, keys) -> None:
    assert a["step"] == b["step"]
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])
