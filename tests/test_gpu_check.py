"""bench/gpu_check.py: the one command that measures a GPU, run here with --tiny on the CPU (every
report section present, the machine named), and its offline-wheelhouse command line (no network)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_run_writes_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    sections = _module().SECTIONS
    assert sections == ["machine", "matmul", "kernel_tests", "kernels", "rollout", "train_step", "video"]
    for name in sections:
        assert report[name]["status"] in ("ok", "skipped"), (name, report[name])
        assert f"## {name}" in md
        if report[name]["status"] == "skipped":
            assert "is not installed" in report[name]["reason"], report[name]
    # nothing claims a GPU number: the report names the machine that measured it
    assert report["meta"]["machine"].startswith("CPU only") or "NVIDIA" in report["meta"]["machine"]
    assert f"Measured on: {report['meta']['machine']}" in md
    k = report["kernels"]
    providers = [r["provider"] for r in k["rows"]]
    for s in ("gemm", "atomic", "sparse"):
        row = k["rows"][providers.index(f"fastebm fused, backward={s}")]
        assert row["ms"] > 0 and row["predicted_ms_at_measured_rates"] > 0 and row["pct_of_matmul"] > 0
    assert any("Liger" in p for p in providers) and any("eager" in p for p in providers)
    assert report["kernel_tests"]["passed"] > 0 and not report["kernel_tests"].get("failed")
    assert report["matmul"]["matmul_tflops"] > 0 and report["matmul"]["copy_gbs"] > 0
    assert report["rollout"]["results"]["shared prefix (fastebm)"]["tokens_per_s"] > 0
    assert {"time/rollout_s", "time/score_s", "time/update_s", "time/step_s"} <= set(report["train_step"]["phases_s"])
    assert report["train_step"]["rewards"] == ["accuracy", "clip", "format", "pcg"]
    assert "fastebm imported from this checkout" in report["machine"]["install"]


def test_a_failing_or_missing_section_does_not_stop_the_others(tmp_path):
    gc = _module()
    ctx = dict(tiny=True)
    real = dict(gc.SECTION_FNS)
    try:
        gc.SECTION_FNS.update({n: (lambda c: {"x": 1}) for n in gc.SECTIONS})
        gc.SECTION_FNS["kernels"] = lambda c: 1 / 0
        gc.SECTION_FNS["video"] = lambda c: gc._need("nvidia.dali_not_there", "nvidia-dali-cuda130")
        ctx["model"] = object()
        report = gc.run_sections(ctx)
    finally:
        gc.SECTION_FNS.clear()
        gc.SECTION_FNS.update(real)
    assert report["kernels"]["status"] == "failed" and "ZeroDivisionError" in report["kernels"]["error"]
    assert report["video"]["status"] == "skipped" and "nvidia-dali-cuda130 is not installed" in report["video"]["reason"]
    assert all(report[n]["status"] == "ok" for n in gc.SECTIONS if n not in ("kernels", "video"))


def test_wheelhouse_command_line_is_offline_ready():
    # --dry-run prints the pip command: binary wheels for the target Python and platform, exact pins of
    # what is installed here, no dependency resolution there, torch and Triton left to the machine.
    proc = subprocess.run([sys.executable, SCRIPT, "--wheelhouse", "/tmp/wh", "--python", "3.12", "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.strip().split()
    assert cmd[1:4] == ["-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "cp312" in cmd
    assert cmd[cmd.index("--dest") + 1] == "/tmp/wh"
    pins = {a.split("==")[0]: a.split("==")[1] for a in cmd if "==" in a}
    import importlib.metadata as md

    for need in ("transformers", "tokenizers", "safetensors", "liger-kernel", "av", "numpy", "rich"):
        assert pins[need] == md.version(need), need
    assert "huggingface-hub" in pins                 # a dependency of a dependency, resolved here
    assert not {"torch", "triton"} & set(pins) and not any(p.startswith("nvidia-cu") for p in pins)
