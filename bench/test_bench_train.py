"""The end-to-end tiny train step, split into its phases: rollout, scoring, update.

    python -m pytest bench/test_bench_train.py

On the CPU: the tiny recipe as shipped (G=4, 24 new tokens, 2 prompts per step). On a GPU the
batch is scaled up (G=8, 128 new tokens, 4 prompts) so the numbers mean something there. Each
phase is timed on the same decoded batch; the update restores the weights afterwards so rounds
are comparable.
"""
import copy
import os

import pytest
import torch

from fastebm.config import load_config
from fastebm.grpo.advantages import combine_rewards
from fastebm.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_train")
    scale = (["rollout.group_size=8", "rollout.max_new_tokens=128", "train.prompts_per_step=4",
              "run.device=cuda"] if GPU else [])
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"),
                      [f"run.output_dir={d / 'run'}", f"model.tiny_cache_dir={d / 'models'}",
                       f"data.sample_dir={d / 'sample'}", "log.progress=false", *scale])
    t = Trainer(cfg)
    batch = t.next_batch()
    roll = t.rollout(batch)
    yield t, batch, roll
    t.close()


def test_rollout(benchmark, trainer):
    t, batch, _ = trainer
    benchmark.extra_info.update(device="cuda" if GPU else "cpu", group_size=t.cfg.rollout.group_size,
                                prompts=len(batch.prompts), max_new_tokens=t.cfg.rollout.max_new_tokens)
    r = benchmark.pedantic(t.rollout, args=(batch,), rounds=3, iterations=1, warmup_rounds=1)
    assert len(r.completion_ids) == len(batch.prompts) * t.cfg.rollout.group_size


def test_score(benchmark, trainer):
    """Rewards + reference (and PCG teacher) log-probs: the trainer's time/score_s."""
    t, batch, roll = trainer
    rewards, _, ref, _ = benchmark.pedantic(t.score_step, args=(batch, roll, 1.0), rounds=3, iterations=1,
                                            warmup_rounds=1)
    assert ref.shape[0] == len(roll.completion_ids) and set(rewards) == set(t.cfg.rewards.enabled)


def test_update(benchmark, trainer):
    t, batch, roll = trainer
    rewards, _, ref, _ = t.score_step(batch, roll, 1.0)
    adv = combine_rewards({n: torch.tensor(v) for n, v in rewards.items()}, t.cfg.rewards.weights,
                          t.cfg.rollout.group_size).to(t.device)
    weights = copy.deepcopy(t.policy.model.state_dict())
    opt = copy.deepcopy(t.optimizer.state_dict())

    def update():
        out = t.update(batch, roll, adv, None, ref, 1.0)
        t.policy.model.load_state_dict(weights)
        t.optimizer.load_state_dict(opt)
        return out

    stats = benchmark.pedantic(update, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(stats["loss"]))
