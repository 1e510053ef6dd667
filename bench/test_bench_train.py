"""The end-to-end tiny train step, split into its phases: rollout, scoring, update; and the whole
step against a release-style step (the guard).

    python -m pytest bench/test_bench_train.py
    python -m pytest bench/test_bench_train.py -m quick      # the whole-step guard only

On the CPU: the tiny recipe as shipped (G=4, 24 new tokens, 2 prompts per step). On a GPU the
batch is scaled up (G=8, 128 new tokens, 4 prompts) so the numbers mean something there. Each
phase is timed on the same decoded batch; the update restores the weights afterwards so rounds
are comparable.

The guard (``test_guard_train_step_vs_release``): ``Trainer.train_step`` of the tiny recipe at
G = 8, greedy (both sides then sample the same completions and do the same work), against the same
step as a release without fastebm's speed-ups would run it, built from fastebm's parts:
``rollout.shared_prefix = false`` (HF generate, every pass with the prefix repeated per sample),
``grpo.kernel = "eager"``, and PCG as the reference computes it, one teacher forward per sample plus
the base (``SequentialPCG``; the trainer then calls it as a plain reward instead of folding its
sequences into the reference pass). Both run on one fixed, decoded batch, interleaved; weights,
optimiser and schedule are restored after every step so each round does the same work.
"""
import copy
import os

import pytest
import torch

from fastebm.config import load_config
from fastebm.grpo.advantages import combine_rewards
from fastebm.model.forward import Prompt
from fastebm.rewards.pcg import PCGReward, teacher_answer_loglik
from fastebm.train.trainer import Trainer

from conftest import TINY_RECIPE, bench_config, bench_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, bench_cache):
    d = tmp_path_factory.mktemp("bench_train")
    scale = (["rollout.group_size=8", "rollout.max_new_tokens=128", "train.prompts_per_step=4",
              "run.device=cuda"] if GPU else [])
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"),
                      [f"run.output_dir={d / 'run'}", *bench_cache.overrides, "log.progress=false", *scale])
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
    scored = benchmark.pedantic(t.score_step, args=(batch, roll), rounds=3, iterations=1, warmup_rounds=1)
    assert scored.ref_logps.shape[0] == len(roll.completion_ids) and set(scored.rewards) == set(t.cfg.rewards.enabled)


def test_update(benchmark, trainer):
    t, batch, roll = trainer
    scored = t.score_step(batch, roll)
    adv = combine_rewards({n: torch.tensor(v) for n, v in scored.rewards.items()}, t.cfg.rewards.weights,
                          t.cfg.rollout.group_size).to(t.device)
    weights = copy.deepcopy(t.policy.model.state_dict())
    opt = copy.deepcopy(t.optimizer.state_dict())

    def update():
        out = t.update(batch, roll, adv, None, scored.ref_logps, t.logprob_temperature)
        t.policy.model.load_state_dict(weights)
        t.optimizer.load_state_dict(opt)
        return out

    stats = benchmark.pedantic(update, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(stats["loss"]))


# ------------------------------------------------------------------------------------- guard --- #

class SequentialPCG:
    """PCG computed the reference's way: for each prompt the base (the answer after the prompt) and
    then every sample's blocks + answer, one unbatched teacher forward each, the prompt repeated.

    Same values as ``PCGReward`` (its plan: safeguard, contexts, answer tokens); a plain callable,
    so the trainer scores it on its own instead of in the reference pass.
    """

    def __init__(self, pcg: PCGReward):
        self.pcg = pcg

    def __call__(self, completions, inputs):
        out = [0.0] * len(completions)
        teacher = self.pcg.teacher
        for g in self.pcg.plan(completions, inputs):
            prompt = Prompt(inputs.prompt_ids[g.prompt], inputs.videos[g.prompt])
            base = float(teacher_answer_loglik(teacher, prompt, [[]], g.answer_ids, kernel=self.pcg.kernel)[0])
            for i, ctx in zip(g.members, g.contexts):
                out[i] = float(teacher_answer_loglik(teacher, prompt, [ctx], g.answer_ids, kernel=self.pcg.kernel)[0]) - base
        return out


STEP = ["rollout.group_size=8", "rollout.temperature=0", "log.progress=false", "train.steps=1000",
        *(["run.device=cuda"] if GPU else [])]
RELEASE = ["rollout.shared_prefix=false", "grpo.kernel=eager"]


class StepRunner:
    """One trainer's ``train_step`` on a fixed batch, its state restored after every call."""

    def __init__(self, trainer: Trainer, batch):
        self.t = trainer
        trainer.next_batch = lambda: batch  # every step on the same decoded batch (no decode in the timing)
        self.saved = [copy.deepcopy(x.state_dict()) for x in (trainer.policy.model, trainer.optimizer,
                                                              trainer.scheduler)]
        self.metrics: list[dict] = []

    def step(self) -> None:
        self.metrics.append(self.t.train_step())

    def restore(self) -> None:
        for x, s in zip((self.t.policy.model, self.t.optimizer, self.t.scheduler), self.saved):
            x.load_state_dict(s)


@pytest.fixture(scope="module")
def step_pair(tmp_path_factory, bench_cache):
    d = tmp_path_factory.mktemp("bench_step")
    fast = Trainer(bench_config(f"run.output_dir={d / 'fastebm'}", *bench_cache.overrides, *STEP))
    release = Trainer(load_config(TINY_RECIPE, [f"run.output_dir={d / 'release'}", *bench_cache.overrides, *STEP, *RELEASE]))
    release.rewards["pcg"] = SequentialPCG(release.rewards["pcg"])
    batch = fast.batches.next(prefetch_next=False)
    yield StepRunner(fast, batch), StepRunner(release, batch)
    fast.close()
    release.close()


@pytest.mark.quick
def test_guard_train_step_vs_release(guard, step_pair):
    fast, release = step_pair
    c = fast.t.cfg
    shape = f"G={c.rollout.group_size} prompts={c.train.prompts_per_step} max_new={c.rollout.max_new_tokens} greedy"
    sides = (release, fast)
    guard.speedup("train_step_speedup_vs_release", op="train_step", shape=shape,
                  reference=("release-style", release.step), fastebm=("fastebm", fast.step),
                  rounds=8, after=lambda i: sides[i].restore())
    # Both sides did the same work: the same greedy completions, rewards and loss (unless an override
    # of the fastebm side changes what is computed; the guard above has spoken by then).
    if not bench_overrides():
        a, b = fast.metrics[-1], release.metrics[-1]
        for k in ("reward/total", "reward/pcg", "loss", "completion/mean_len"):
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-3), (k, a[k], b[k])
