"""Failure is visible: a failing reward raises (naming it), or with on_error = "zero" scores 0 and is counted."""
import os

import pytest

from fastebm.config import load_config
from fastebm.rewards import REWARDS, RewardError, call_reward, register
from fastebm.train.metrics import read_metrics
from fastebm.train.trainer import Trainer, TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def boom(completions, inputs):
    raise RuntimeError("reward server unreachable")


def test_call_reward_raise_and_zero():
    with pytest.raises(RewardError, match="reward 'clip' failed: RuntimeError: reward server unreachable"):
        call_reward("clip", boom, ["a", "b"], None)
    assert call_reward("clip", boom, ["a", "b"], None, on_error="zero") == ([0.0, 0.0], 2)
    assert call_reward("ok", lambda c, i: [1, 2], ["a", "b"], None) == ([1.0, 2.0], 0)
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        call_reward("short", lambda c, i: [1], ["a", "b"], None)


@pytest.fixture
def broken_reward():
    register("broken")(lambda cfg, ctx: boom)
    yield "broken"
    REWARDS.pop("broken")


@pytest.mark.parametrize("on_error", ["raise", "zero"])
def test_trainer_on_error(broken_reward, tmp_path, model_dir, on_error):
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"), [
        f"run.output_dir={tmp_path / 'run'}", f"model.tiny_cache_dir={model_dir}",
        f"data.sample_dir={tmp_path / 'data'}", "log.progress=false", "train.steps=1", "grpo.beta=0",
        "rewards.enabled=['format', 'broken']", "rewards.weights={format = 1.0, broken = 1.0}",
        f"rewards.on_error={on_error}"])
    t = Trainer(cfg)
    if on_error == "raise":
        with pytest.raises(TrainingError, match="step 1: reward 'broken' failed"):
            t.train()
        return
    t.train()
    (m,) = read_metrics(str(tmp_path / "run"))
    G, P = cfg.rollout.group_size, cfg.train.prompts_per_step
    assert m["reward/broken_errors"] == G * P and m["reward/broken"] == 0.0
    assert m["reward/format_errors"] == 0
