"""fastebm.integrations.trl.FusedGRPOTrainer against TRL 1.16's own GRPOTrainer, offline on the CPU.

A tiny random causal LM (Qwen2 architecture, 2 layers, hidden 32) with fastebm's tiny BPE
tokenizer is built once into a temporary folder and loaded by both trainers through TRL's own
loading code; rewards come from a Python function (no reward model, no hub).

- ``test_two_steps_equal_trl`` (under a second each, with one torch thread): two training steps with each trainer from the same seed, for
  every loss type, log the same losses and metrics and leave the same weights (fp32 tolerance).
  ``num_iterations = 2`` reuses the step-1 completions at step 2, so the second step runs with
  importance ratios != 1 (clipping, delta, bias-corrected KL against a reference model, beta 0.04)
  and both trainers see the same completions; plain SGD, so a gradient that is zero up to rounding
  cannot turn into a full Adam step of either sign.
- ``test_compute_loss_equals_trl_*``: one real trainer, hand-made batches with ragged
  completion masks, old / reference / rollout-engine log-probs, tool masks, per-token advantages,
  for every loss type and the options TRL applies inside its loss (off-policy mask, entropy
  quantile, engine importance sampling in token and sequence modes): TRL's ``_compute_loss`` and
  the fused one on the same trainer give the same loss, gradients and logged metrics.
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from fastebm.integrations.trl import FusedGRPOTrainer, loss_options_from_grpo_config  # noqa: E402

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
PROMPTS = ["the video shows", "a cat and", "what is", "answer:"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    """A tiny random Qwen2 causal LM and tokenizer saved to disk (fp32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastebm.tiny import build_tiny_tokenizer

    path = str(tmp_path_factory.mktemp("tiny-causal-lm"))
    tok = build_tiny_tokenizer(path)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def reward_fn(completions, **kwargs):
    """Longer is better, the letter 'a' costs: different rewards within a group, so advantages != 0."""
    return [len(c) / 10 - c.count("a") for c in completions]


def _args(out_dir, **kw) -> GRPOConfig:
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                max_steps=2, use_cpu=True, bf16=False, report_to=[], logging_steps=1, seed=0, learning_rate=0.1,
                optim="sgd", save_strategy="no", num_iterations=2, beta=0.04, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def _trainer(cls, tiny_lm, out_dir, **kw):
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=tiny_lm, reward_funcs=reward_fn, args=_args(out_dir, **kw),
                   train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


def _loss_type_args(loss_type) -> dict:
    kw = dict(loss_type=loss_type)
    if loss_type == "luspo":
        kw["importance_sampling_level"] = "sequence"     # LUSPO's setting (TRL warns otherwise)
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.2                         # CISPO's raw weight cap inside the ratio range
    return kw


# --------------------------------------------------------------------------------------------- #
# Two training steps, every loss type
# --------------------------------------------------------------------------------------------- #

COMPARED_LOGS = ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                 "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean", "reward")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_steps_equal_trl(loss_type, tiny_lm, tmp_path):
    from safetensors.torch import load_file

    initial = load_file(f"{tiny_lm}/model.safetensors")
    runs = {}
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        trainer = _trainer(cls, tiny_lm, tmp_path / cls.__name__, **_loss_type_args(loss_type))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        runs[cls] = (logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    (trl_logs, trl_w), (our_logs, our_w) = runs[GRPOTrainer], runs[FusedGRPOTrainer]
    assert len(trl_logs) == len(our_logs) == 2
    for step, (a, b) in enumerate(zip(trl_logs, our_logs), 1):
        keys = [k for k in COMPARED_LOGS if k in a]
        assert keys == [k for k in COMPARED_LOGS if k in b], f"step {step}: logged metrics differ"
        for k in keys:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), f"step {step} {k}: TRL {a[k]} fused {b[k]}"
    moved = max((trl_w[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-2, "the two steps must move the weights far beyond the tolerance"
    for k in trl_w:
        torch.testing.assert_close(our_w[k], trl_w[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    assert trl_logs[1]["kl"] > 0  # step 2 runs off the reference: the KL (bias-corrected) is live


# --------------------------------------------------------------------------------------------- #
# _compute_loss on one real trainer, hand-made batches
# --------------------------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def fused_trainer(tiny_lm, tmp_path_factory):
    t = _trainer(FusedGRPOTrainer, tiny_lm, tmp_path_factory.mktemp("fused"), max_steps=1)
    # Set by Trainer's loop on every step; 2 exercises the losses' scaling for gradient accumulation.
    t.current_gradient_accumulation_steps = 2
    return t


def _batch(trainer, seed=0, per_token_adv=False):
    """B = 5 sequences: prompts of 4 tokens (one left-padded), completions of 7 with ragged lengths
    and one fully masked; log-probs near the policy's own."""
    g = torch.Generator().manual_seed(seed)
    V = trainer.model.config.vocab_size
    B, P, C = 5, 4, 7
    prompt_ids = torch.randint(0, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    completion_ids = torch.randint(0, V, (B, C), generator=g)
    lengths = torch.tensor([7, 5, 2, 6, 0])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), C)
    noise = lambda s: s * torch.randn(B, C, generator=g)  # noqa: E731
    adv = torch.randn(B, C, generator=g) if per_token_adv else torch.tensor([1.2, -0.8, 0.5, -1.5, 0.3])
    tool_mask = torch.ones(B, C, dtype=torch.long)
    tool_mask[3, 2:4] = 0
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=adv, old_per_token_logps=logps + noise(0.4),
                ref_per_token_logps=logps + noise(0.3), sampling_per_token_logps=logps + noise(0.5),
                num_items_in_batch=torch.tensor(float(completion_mask.sum() + 9)), tool_mask=tool_mask,
                importance_sampling_ratio=torch.exp(noise(0.2) * completion_mask).clamp(max=3.0))


def _configure(trainer, **kw):
    """Set GRPOConfig fields (and the attributes TRL's trainer copies from them) on a live trainer."""
    defaults = dict(loss_type="dapo", importance_sampling_level="token", beta=0.04, epsilon=0.2, epsilon_high=None,
                    delta=None, use_bias_correction_kl=True, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    defaults.update(kw)
    for k, v in defaults.items():
        setattr(trainer.args, k, v)
    a = trainer.args
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = a.loss_type, a.importance_sampling_level, a.beta
    trainer.epsilon_low = a.epsilon
    trainer.epsilon_high = a.epsilon_high if a.epsilon_high is not None else a.epsilon
    trainer.top_entropy_quantile, trainer.off_policy_mask_threshold = a.top_entropy_quantile, a.off_policy_mask_threshold
    trainer.fastebm_options = loss_options_from_grpo_config(a)


def _run(trainer, compute, inputs):
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = compute(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _assert_same(trainer, inputs, what):
    trl = _run(trainer, lambda m, x: GRPOTrainer._compute_loss(trainer, m, x), inputs)
    ours = _run(trainer, trainer._compute_loss, inputs)
    torch.testing.assert_close(ours[0], trl[0], rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: loss: {m}")
    assert ours[1].keys() == trl[1].keys()
    for k in trl[1]:
        torch.testing.assert_close(ours[1][k], trl[1][k], rtol=1e-4, atol=1e-7, msg=lambda m: f"{what}: {k}: {m}")
    assert ours[2].keys() == trl[2].keys(), what
    for k in trl[2]:
        assert abs(ours[2][k] - trl[2][k]) <= 1e-5 * max(1.0, abs(trl[2][k])) or (ours[2][k] != ours[2][k]
                                                                                 and trl[2][k] != trl[2][k]), \
            f"{what}: metric {k}: TRL {trl[2][k]} fused {ours[2][k]}"
    return trl


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_compute_loss_equals_trl_every_loss_type(loss_type, fused_trainer):
    t = fused_trainer
    inputs = _batch(t)
    for level in ("token", "sequence"):
        for delta in (None, 1.4):
            _configure(t, delta=delta, **{**_loss_type_args(loss_type), "importance_sampling_level": level})
            trl = _assert_same(t, inputs, f"{loss_type} {level} delta={delta}")
            assert trl[0] != 0 and len(trl[1]) > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_compute_loss_equals_trl_with_the_in_loss_options(loss_type, fused_trainer):
    t = fused_trainer
    inputs = _batch(t, seed=1)
    cases = {
        "off-policy mask": dict(off_policy_mask_threshold=0.05),
        "entropy quantile": dict(top_entropy_quantile=0.3),
        "no bias-corrected KL, beta 0.1": dict(use_bias_correction_kl=False, beta=0.1),
        "beta 0": dict(beta=0.0),
        "sapo temperatures": dict(sapo_temperature_pos=0.6, sapo_temperature_neg=1.7),
    }
    for name, kw in cases.items():
        _configure(t, **_loss_type_args(loss_type), **kw)
        _assert_same(t, inputs, f"{loss_type} {name}")
    # the rollout engine's importance-sampling ratio, per token and per sequence (TRL's modes)
    _configure(t, **_loss_type_args(loss_type))
    t.use_vllm = t.vllm_importance_sampling_correction = True
    try:
        _assert_same(t, inputs, f"{loss_type} engine IS per token")
        seq = dict(inputs, importance_sampling_ratio=inputs["importance_sampling_ratio"][:, :1] * 1.3)
        _assert_same(t, seq, f"{loss_type} engine IS per sequence")
    finally:
        t.use_vllm = False
    # per-token advantages (TRL's subclasses), eval mode (no accumulation scaling)
    _assert_same(t, _batch(t, seed=2, per_token_adv=True), f"{loss_type} per-token advantages")
    t.model.eval()
    try:
        _assert_same(t, inputs, f"{loss_type} eval mode")
    finally:
        t.model.train()


def test_options_follow_grpo_config_and_name_its_fields():
    args = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[])
    o = loss_options_from_grpo_config(args)
    # TRL 1.16's defaults carried over as they are
    assert (o.loss_type, o.use_bias_correction_kl, o.beta, o.epsilon_low, o.epsilon_high) == ("dapo", True, 0.0, 0.2, 0.2)
    args2 = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[], epsilon_high=0.28, loss_type="vespo",
                       vespo_k_pos=1.5, top_entropy_quantile=0.2, off_policy_mask_threshold=0.5, delta=1.6,
                       temperature=0.7)
    o2 = loss_options_from_grpo_config(args2)
    assert (o2.epsilon_high, o2.loss_type, o2.vespo_k_pos, o2.top_entropy_quantile, o2.off_policy_mask_threshold,
            o2.delta, o2.temperature) == (0.28, "vespo", 1.5, 0.2, 0.5, 1.6, 0.7)
    args.top_entropy_quantile = 1.5
    with pytest.raises(ValueError, match=r"GRPOConfig\.top_entropy_quantile"):
        loss_options_from_grpo_config(args)


def test_refuses_what_it_cannot_honour(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="entropy_coef / use_adaptive_entropy"):
        _trainer(FusedGRPOTrainer, tiny_lm, tmp_path, entropy_coef=0.01)
    with pytest.raises(ValueError, match="entropy_coef / use_adaptive_entropy"):
        _trainer(FusedGRPOTrainer, tiny_lm, tmp_path, use_adaptive_entropy=True)
    # a model whose logits are soft-capped after the lm_head
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_lm)
    capped = tmp_path / "capped"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.config.final_logit_softcapping = 30.0
    model.save_pretrained(capped)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(capped)
    assert cfg.get_text_config().to_dict().get("final_logit_softcapping") is None
    with pytest.raises(ValueError, match="final_logit_softcapping = 30.0"):
        _trainer(FusedGRPOTrainer, str(capped), tmp_path)
