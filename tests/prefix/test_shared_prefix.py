"""Shared prefix vs repeated prefix on tiny Qwen2-VL and Qwen2.5-VL with real video input.

Greedy rollouts give the same tokens; the log-probs of every pass (the rollout's own, the packed
scoring forward with block-by-block attention and with the dense block mask, the repeated forward)
agree within 1e-4; the training loss and every parameter
gradient agree within fp32 tolerance — with prompts of different lengths in one batch and
completions of different lengths.
"""
import pytest
import torch

from fastebm.config import RolloutConfig
from fastebm.grpo.loss import compute_grpo_loss
from fastebm.kernels import GRPOLossOptions
from fastebm.kernels.fused_linear_logprobs import eager_token_logprobs as token_logprobs
from fastebm.model.decode import shared_prefix_rollout
from fastebm.model.forward import completion_hidden_states, lm_head_weight
from fastebm.model import packed_attention
from fastebm.model.prefix import pack_groups, shared_prefix_hidden_states
from fastebm.model.rollout import rollout

from helpers import clip_sample, make_prompt, tiny_model


@pytest.fixture(scope="module", params=["qwen2vl", "qwen25vl"])
def setup(request, tmp_path_factory):
    lm = tiny_model(request.param, str(tmp_path_factory.getbasetemp() / "models"))
    d = tmp_path_factory.mktemp("clips")
    v1 = clip_sample(str(d / "a.webm"), "vp9", seed=1)
    v2 = clip_sample(str(d / "b.mp4"), "h264", seed=2, num_frames=40, width=128, height=96)
    return lm, [make_prompt(lm, v1, 0, history=1), make_prompt(lm, v2, 4, history=0)]


def test_pack_groups_keeps_order():
    assert pack_groups([0, 0, 1, 0, 2]) == [(0, [0, 1, 3]), (1, [2]), (2, [4])]


@pytest.mark.parametrize("fuse", [False, True], ids=["model-weights", "fused-weights"])
def test_greedy_rollouts_identical(setup, fuse):
    lm, prompts = setup
    cfg = RolloutConfig(group_size=4, temperature=0.0, max_new_tokens=12)
    a = rollout(lm.model, lm.tokenizer, prompts, cfg)
    b = shared_prefix_rollout(lm.model, lm.tokenizer, prompts, cfg, fuse=fuse)
    assert a.completion_ids == b.completion_ids and a.truncated == b.truncated and a.texts == b.texts
    assert b.prefill_tokens == sum(len(p.ids) for p in prompts)  # the prefix runs once per prompt


@pytest.mark.parametrize("fuse", [False, True], ids=["model-weights", "fused-weights"])
def test_logprobs_of_every_pass_agree(setup, fuse):
    lm, prompts = setup
    torch.manual_seed(0)
    cfg = RolloutConfig(group_size=3, temperature=1.0, max_new_tokens=10)
    r = shared_prefix_rollout(lm.model, lm.tokenizer, prompts, cfg, fuse=fuse)
    assert r.prefill_tokens == sum(len(p.ids) for p in prompts)
    hf = rollout(lm.model, lm.tokenizer, prompts, cfg)
    assert hf.prefill_tokens == 3 * r.prefill_tokens  # generate() re-runs the prefix per sample
    W = lm_head_weight(lm.model)
    with torch.no_grad():
        rep = completion_hidden_states(lm.model, prompts, r.completion_ids, r.prompt_index)
        pk = shared_prefix_hidden_states(lm.model, prompts, r.completion_ids, r.prompt_index)
        pk_mask = shared_prefix_hidden_states(lm.model, prompts, r.completion_ids, r.prompt_index, attention="mask")
        lp_rep = token_logprobs(rep.hidden, W, rep.ids)
        lp_pk = token_logprobs(pk.hidden, W, pk.ids)
        lp_pk_mask = token_logprobs(pk_mask.hidden, W, pk_mask.ids)
    assert torch.equal(rep.mask, pk.mask) and torch.equal(rep.ids, pk.ids)
    m = rep.mask.bool()
    assert (lp_rep - lp_pk)[m].abs().max() < 1e-4
    assert (lp_rep - lp_pk_mask)[m].abs().max() < 1e-4  # the dense-mask packed path (the check)
    for i, lps in enumerate(r.logprobs):
        torch.testing.assert_close(torch.tensor(lps), lp_pk[i, :len(lps)], atol=1e-4, rtol=0)
    assert pk.num_prompt_tokens * 3 == rep.num_prompt_tokens


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_training_forward_loss_and_gradients_agree(setup, checkpointing):
    """With gradient checkpointing a layer's forward runs again inside backward: the packed row's
    attention must be the same there too."""
    lm, prompts = setup
    model = lm.model
    W = lm_head_weight(model)
    was_training = model.training
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing applies in training mode only
    # completions of different lengths; the first prompt has three samples, the second two
    comps = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46], [50]]
    index = [0, 0, 0, 1, 1]
    adv = torch.tensor([1.0, -0.5, 0.3, 0.7, -1.5])
    with torch.no_grad():
        ref = completion_hidden_states(model, prompts, comps, index)
        ref_lp = token_logprobs(ref.hidden, W, ref.ids) - 0.05  # a fake reference model, KL != 0

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        cb = fn(model, prompts, comps, index)
        out = compute_grpo_loss(cb.hidden, W, cb.ids, cb.mask, adv, None, ref_lp,
                                GRPOLossOptions(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.9))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        la, ga = loss_and_grads(completion_hidden_states)
        lb, gb = loss_and_grads(shared_prefix_hidden_states)
    finally:
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.activation_checkpointing_disable()
        model.train(was_training)
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=1e-5)
    assert ga.keys() == gb.keys() and any("visual" in n for n in ga)  # gradients reach the vision tower
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-6, rtol=1e-4, msg=n)


def test_pcg_teacher_pass_packed_equals_repeated(setup):
    from fastebm.rewards.pcg import teacher_answer_loglik

    lm, prompts = setup
    contexts = [[60, 61, 62], [70, 71, 72, 73, 74, 75], []]  # two samples' blocks, then the base
    answer = [80, 81, 82, 83]
    a = teacher_answer_loglik(lm, prompts[0], contexts, answer, shared_prefix=False)
    b = teacher_answer_loglik(lm, prompts[0], contexts, answer, shared_prefix=True)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_eager_attention_model_packs_with_the_dense_mask(setup):
    """A model loaded with eager attention keeps it (the packed row then uses the dense block mask)
    and gives the repeated forward's log-probs; an SDPA model is switched to fastebm's SDPA."""
    from fastebm.model.loading import load_model

    lm, prompts = setup
    eager = load_model(lm.path, torch.device("cpu"), attn_implementation="eager").model
    comps, index = [[10, 11, 12], [20, 21, 22, 23, 24], [30]], [0, 0, 1]
    with torch.no_grad():
        shared_prefix_hidden_states(lm.model, prompts, comps, index)
    assert lm.model.model.language_model.config._attn_implementation == "fastebm_sdpa"
    assert lm.model.model.visual.config._attn_implementation == "sdpa"  # the vision tower keeps its own
    W = lm_head_weight(eager)
    with torch.no_grad():
        rep = completion_hidden_states(eager, prompts, comps, index)
        pk = shared_prefix_hidden_states(eager, prompts, comps, index)
    assert eager.model.language_model.config._attn_implementation == "eager"
    m = rep.mask.bool()
    lp_rep, lp_pk = token_logprobs(rep.hidden, W, rep.ids), token_logprobs(pk.hidden, W, pk.ids)
    assert (lp_rep - lp_pk)[m].abs().max() < 1e-4


def test_generate_unchanged_by_the_attention_switch(setup):
    """The text attention 'fastebm_sdpa' is transformers' SDPA for every forward without a packed
    layout: generate (padding masks, KV cache) samples the same greedy tokens before and after."""
    from fastebm.model.loading import load_model

    lm, prompts = setup
    fresh = load_model(lm.path, torch.device("cpu"))
    cfg = RolloutConfig(group_size=2, temperature=0.0, max_new_tokens=8)
    before = rollout(fresh.model, fresh.tokenizer, prompts, cfg)
    assert packed_attention.enable(fresh.model)
    assert fresh.model.model.language_model.config._attn_implementation == packed_attention.NAME
    after = rollout(fresh.model, fresh.tokenizer, prompts, cfg)
    assert before.completion_ids == after.completion_ids
