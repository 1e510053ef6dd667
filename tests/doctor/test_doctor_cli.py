"""``fastebm doctor`` on this machine (the real CLI in a subprocess): the environment, every fast path
checked against its reference with pass or "skipped: reason", the recipe's model and reward paths;
``--costs``; a failing check is reported and makes the exit status non-zero."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastebm.doctor import checks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def doctor(tmp_path_factory):
    d = tmp_path_factory.mktemp("doctor")
    out = d / "doctor.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the doctor decides
    proc = subprocess.run([sys.executable, "-m", "fastebm.cli", "doctor", "--recipe", "recipes/tiny.toml",
                           f"model.tiny_cache_dir={d / 'models'}", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_doctor_lists_every_check_with_pass_or_a_skip_reason(doctor):
    proc, report = doctor
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    env = report["environment"]
    for key in ("python", "torch", "triton", "transformers", "flash-attn", "DALI", "PyAV", "open_clip",
                "torch CUDA build"):
        assert env[key], key
    assert ("GPU" in env) != any(k.startswith("GPU ") for k in env)
    names = [c["name"] for c in report["checks"]]
    for s in ("gemm", "atomic", "sparse"):
        assert any(f"fused GRPO loss + gradients, backward={s}" in n for n in names), s
    for what in ("token log-probs", "logits GRPO loss", "cascade attention", "packed attention", "group advantages",
                 "video: PyAV", "video: DALI", "recipe tiny.toml: config", "recipe tiny.toml: model",
                 "recipe tiny.toml: reward format", "recipe tiny.toml: reward accuracy", "recipe tiny.toml: reward clip",
                 "recipe tiny.toml: reward pcg"):
        assert any(what in n for n in names), what
    if not torch.cuda.is_available():   # the CPU: the torch path, and the Triton kernels under the interpreter
        assert any("(torch path, float32)" in n for n in names) and any("triton, interpreter" in n for n in names)
    for c in report["checks"]:
        assert c["status"] in ("pass", "skipped"), c
        if c["status"] == "skipped":
            assert c["detail"] and f"skipped: {c['detail']}" in proc.stdout, c
        else:
            assert c["worst"] and "<=" in c["worst"] and c["seconds"] >= 0, c
    assert f"{sum(c['status'] == 'pass' for c in report['checks'])} passed, 0 failed" in proc.stdout


def test_a_failing_check_fails_and_names_itself(monkeypatch):
    bad = checks.run_check("planted", lambda: [("d_weight", 1e-2, 1e-5), ("loss", 0.0, 1e-5)])
    assert bad.status == "fail" and "d_weight: 1.000e-02 > 1.000e-05" in bad.detail
    crash = checks.run_check("crash", lambda: 1 / 0)
    assert crash.status == "fail" and "ZeroDivisionError" in crash.detail
    skip = checks.run_check("skip", lambda: (_ for _ in ()).throw(checks.Skip("nvidia-dali is not installed")))
    assert skip.status == "skipped" and "nvidia-dali" in skip.detail
    text = checks.format_checks([bad, crash, skip])
    assert "FAIL    planted" in text and "SKIPPED skip" in text and "skipped: nvidia-dali is not installed" in text


def test_a_broken_fast_path_is_caught(monkeypatch):
    # The check really compares: a backward that returns a wrong d hidden fails it.
    from fastebm.kernels import fused_linear_logprobs as ll

    real = ll.linear_logprob_bwd_torch

    def wrong(*a, **k):
        dx, dw, db = real(*a, **k)
        return dx * 1.01, dw, db
    monkeypatch.setattr(ll, "linear_logprob_bwd_torch", wrong)
    r = checks.run_check("fused", lambda: checks.check_fused_loss(torch.device("cpu"), torch.float32, "torch", "gemm"))
    assert r.status == "fail" and "d_hidden" in r.detail


def test_costs_command_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "fastebm.cli", "doctor", "--costs", "--matmul-tflops", "500"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "predicted at 500 TFLOP/s" in proc.stdout and "| 7B (N=8,192, H=3,584, V=152,064) | gemm |" in proc.stdout
