"""The trainer with rollout.shared_prefix = true and false on the tiny recipe, greedy, G = 8:
the same rewards and loss at every step (the timings are compared in bench/, not here)."""
import os

import pytest

from fastebm.config import load_config
from fastebm.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.parametrize("mu", [1, 2])
def test_same_rewards_and_loss_per_step(tmp_path, mu):
    def run(shared):
        cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"), [
            f"run.output_dir={tmp_path / str(shared)}", f"model.tiny_cache_dir={tmp_path / 'models'}",
            f"data.sample_dir={tmp_path / 'sample'}", "log.progress=false", "train.steps=3",
            "rollout.temperature=0", "rollout.group_size=8", f"rollout.shared_prefix={str(shared).lower()}",
            f"grpo.mu={mu}", "train.checkpoint_every=0"])
        return Trainer(cfg).train()

    a, b = run(False), run(True)
    for x, y in zip(a, b):
        for k in x:
            if k.startswith("reward/") or k in ("tokens/completion", "completion/mean_len", "adv/std"):
                assert x[k] == y[k], k
        for k in ("loss", "kl", "loss/last", "grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-5 + 1e-4 * abs(x[k]), (k, x[k], y[k])
        assert y["tokens/prefix"] < x["tokens/prefix"]
