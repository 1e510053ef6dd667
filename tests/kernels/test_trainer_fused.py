"""The trainer with grpo.kernel = fused (the default) and = reference: the same losses and the same
parameter updates on the tiny model, through the CPU chunked path and through the Triton kernels
(interpreted here)."""
import os

import pytest
import torch

from fastebm.config import load_config
from fastebm.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_and_reference_train_alike(tmp_path, monkeypatch, backend):
    monkeypatch.setenv("FASTEBM_KERNEL_BACKEND", backend)

    def run(kernel):
        cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"), [
            f"run.output_dir={tmp_path / kernel}", f"model.tiny_cache_dir={tmp_path / 'models'}",
            f"data.sample_dir={tmp_path / 'sample'}", "log.progress=false", "train.steps=2",
            "rollout.group_size=2", "rollout.max_new_tokens=8", "rewards.enabled=['format','accuracy']",
            "grpo.mu=2", "grpo.epsilon_high=0.28", "train.checkpoint_every=0", f"grpo.kernel={kernel}"])
        t = Trainer(cfg)
        hist = t.train()
        return hist, {n: p.detach().clone() for n, p in t.policy.model.named_parameters()}

    (hf, wf), (hr, wr) = run("fused"), run("eager")
    for a, b in zip(hf, hr):
        for k in ("loss", "loss/last", "kl", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 + 1e-4 * abs(b[k]), (k, a[k], b[k])
        assert a["reward/format"] == b["reward/format"]
    for n in wr:
        torch.testing.assert_close(wf[n], wr[n], atol=1e-6, rtol=1e-4, msg=n)
