"""The trainer with rollout.shared_prefix = true and false on the tiny recipe, greedy, G = 8:
the same rewards, loss and gradient norm at every step, also with gradient checkpointing (the
timings are compared in bench/, not here)."""
import os

import pytest

from fastebm.config import load_config
from fastebm.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.parametrize("mu,checkpointing", [(1, False), (2, False), (1, True)],
                         ids=["mu1", "mu2", "mu1-gradient-checkpointing"])
def test_same_rewards_and_loss_per_step(tmp_path, mu, checkpointing):
    def run(shared):
        cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"), [
            f"run.output_dir={tmp_path / str(shared)}", f"model.tiny_cache_dir={tmp_path / 'models'}",
            f"data.sample_dir={tmp_path / 'sample'}", "log.progress=false", "train.steps=3",
            "rollout.temperature=0", "rollout.group_size=8", f"rollout.shared_prefix={str(shared).lower()}",
            f"grpo.mu={mu}", "train.checkpoint_every=0", f"model.gradient_checkpointing={str(checkpointing).lower()}"])
        return Trainer(cfg).train()

    a, b = run(False), run(True)
    for x, y in zip(a, b):
        for k in x:
            if k.startswith("reward/") or k in ("tokens/completion", "completion/mean_len", "adv/std"):
                assert x[k] == y[k], k
        for k in ("loss", "kl", "loss/last", "grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-5 + 1e-4 * abs(x[k]), (k, x[k], y[k])
        assert y["tokens/prefix"] < x["tokens/prefix"]


def test_reference_and_pcg_share_one_packed_pass(tmp_path):
    """The joint pass (KL suffixes and PCG suffixes on one copy of the reference prefix) gives the
    KL log-probs of the plain reference pass and the PCG values of the reward run on its own."""
    import torch

    from fastebm.model.rollout import RolloutResult

    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"), [
        f"run.output_dir={tmp_path / 'run'}", f"model.tiny_cache_dir={tmp_path / 'models'}",
        f"data.sample_dir={tmp_path / 'sample'}", "log.progress=false", "rollout.group_size=3",
        "rewards.pcg.safeguard=false"])
    t = Trainer(cfg)
    batch = t.next_batch()
    tok = t.policy.tokenizer
    texts = ["<vision> I see a red shape </vision> <think> someone is waiting </think> <answer> Stay here. </answer>",
             "no tags at all",
             "<vision> a green shape moves </vision><think> danger </think><answer> Run. </answer>"] * 2
    comps = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in texts]
    roll = RolloutResult(comps, [0, 0, 0, 1, 1, 1], texts, [False] * 6, 0)
    inner, calls = t.reference.model.model, []
    orig = inner.forward
    inner.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    scored = t.score_step(batch, roll)  # the reference pass carries PCG's teacher requests
    inner.forward = orig
    assert len(calls) == 2  # two prompts: one reference forward each, KL and PCG sequences together
    ref_joint, pcg_joint, errors = scored.ref_logps, scored.rewards["pcg"], scored.reward_errors["pcg"]
    ref_plain, _, _ = t.reference_pass(batch, roll, {})  # the KL pass alone
    pcg_plain = t.rewards["pcg"](texts, t.reward_inputs(batch, roll))
    t.close()
    assert errors == 0
    torch.testing.assert_close(ref_joint, ref_plain, atol=1e-5, rtol=0)
    assert pcg_plain[1] == 0.0 and pcg_plain[0] != 0.0
    for a, b in zip(pcg_joint, pcg_plain):
        assert abs(a - b) < 1e-5
