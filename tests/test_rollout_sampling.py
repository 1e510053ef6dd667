"""Sampling with temperature, top-k and top-p, as transformers does it, in both rollout paths.

From fixed logits, many draws (fixed seeds): no token outside the top-k / top-p set ever appears and
the rest follow the renormalised distribution (chi-square goodness of fit), where the set and the
distribution are computed here in float64 and checked against transformers' own warpers. The
logits are chosen so that the order matters (top-p before top-k keeps another set). The HF
``generate`` path does not take settings from the checkpoint's generation_config.json (a Qwen-like
top_k=1 / repetition_penalty there would change the draws). The rollout's old log-probs stay the
full-softmax log-probs at the temperature: they equal a full forward's, not the truncated ones.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from fastebm.config import RolloutConfig
from fastebm.model.decode import sample_tokens, shared_prefix_rollout
from fastebm.model.forward import lm_head_weight, video_inputs
from fastebm.model.rollout import rollout, suppressed_ids

from helpers import clip_sample, make_prompt, tiny_model

TEMP, TOP_K, TOP_P = 0.8, 6, 0.75
MODEL_TOP_P = 0.9  # on the tiny model's logits: keeps 4 of the top 6 (top-p first would keep all 6)


def expected_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                          order: str = "k-then-p") -> np.ndarray:
    """The sampling distribution in float64: softmax(logits / T), top-k, renormalise, top-p (the
    smallest high-probability set whose mass exceeds top_p ... as transformers: drop the low tail of
    mass <= 1 - top_p, keep the top token), renormalise. ``order="p-then-k"``: the wrong order."""
    z = logits.astype(np.float64) / temperature
    keep = np.isfinite(z)

    def topk(keep):
        kth = np.sort(z[keep])[::-1][min(top_k, keep.sum()) - 1]
        return keep & (z >= kth)

    def topp(keep):
        p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        p /= p.sum()
        idx = np.argsort(p, kind="stable")            # ascending
        tail = np.cumsum(p[idx]) <= 1 - top_p
        tail[-1] = False
        out = keep.copy()
        out[idx[tail]] = False
        return out

    keep = topp(topk(keep)) if order == "k-then-p" else topk(topp(keep))
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    return p / p.sum()


def transformers_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    x = logits[None].clone()
    for w in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        x = w(None, x)
    return x.softmax(-1)[0].double().numpy()


def check_draws(draws: np.ndarray, expected: np.ndarray):
    """No draw outside the support; the counts fit the expected distribution (chi-square, p > 1e-3)."""
    support = expected > 0
    counts = np.bincount(draws, minlength=len(expected))
    assert counts[~support].sum() == 0, f"tokens outside the top-k/top-p set drawn: {np.nonzero(counts * ~support)}"
    assert support.sum() >= 2  # a real distribution, not one forced token
    res = chisquare(counts[support], expected[support] * len(draws))
    assert res.pvalue > 1e-3, (counts[support], expected[support] * len(draws), res)


def discriminating_logits(V: int = 40, seed: int = 5) -> torch.Tensor:
    """Logits where top-k then top-p keeps a different set than top-p then top-k (so the order is tested)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) * 1.5
    x[:4] = torch.tensor([3.0, 2.6, 2.4, 2.2])
    return x


def test_reference_distribution_is_transformers_and_order_matters():
    logits = discriminating_logits()
    exp = expected_distribution(logits.numpy(), TEMP, TOP_K, TOP_P)
    np.testing.assert_allclose(exp, transformers_distribution(logits, TEMP, TOP_K, TOP_P), atol=1e-6)
    wrong = expected_distribution(logits.numpy(), TEMP, TOP_K, TOP_P, order="p-then-k")
    assert set(np.nonzero(exp)[0]) != set(np.nonzero(wrong)[0])
    assert 2 <= (exp > 0).sum() < TOP_K  # top-p cut inside the top-k set


def test_sample_tokens_follows_the_truncated_distribution():
    logits = discriminating_logits()
    logits[7] = float("-inf")  # a suppressed token
    n = 40_000
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits[None].expand(n, -1).contiguous(), TEMP, TOP_K, TOP_P, generator=g).numpy()
    exp = expected_distribution(logits.numpy(), TEMP, TOP_K, TOP_P)
    check_draws(draws, exp)
    # control: the same draws do not fit the untruncated distribution
    full = expected_distribution(logits.numpy(), TEMP, 10**6, 1.0)
    counts = np.bincount(draws, minlength=len(full))
    assert counts[(full > 0) & (exp == 0)].sum() == 0 and ((full > 0) & (exp == 0)).any()


# --------------------------------------------------------------------------------------------------
# Both rollout paths on a tiny Qwen2-VL with a real clip
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A tiny model whose first sampled token has a spread-out distribution (lm_head scaled), one prompt,
    and that token's fixed logits from a full forward (suppressed tokens -inf, as the rollouts mask them)."""
    lm = tiny_model("qwen2vl", str(tmp_path_factory.getbasetemp() / "models"))
    video = clip_sample(str(tmp_path_factory.mktemp("clips") / "a.webm"), "vp9", seed=3)
    prompt = make_prompt(lm, video, 0, history=1)
    model = lm.model
    ids = torch.tensor([prompt.ids])
    v = video_inputs([prompt.video], "cpu")

    def last_logits():
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=v["pixel_values_videos"],
                        video_grid_thw=v["video_grid_thw"],
                        mm_token_type_ids=(ids == model.config.video_token_id).to(torch.int32) * 2)
        return out.logits[0, -1].float()

    with torch.no_grad():
        lm_head_weight(model).mul_(2.5 / float(last_logits().std()))  # logits with a std of about 2.5
    logits = last_logits()
    logits[suppressed_ids(model)] = float("-inf")
    exp = expected_distribution(logits.numpy(), TEMP, TOP_K, MODEL_TOP_P)
    wrong = expected_distribution(logits.numpy(), TEMP, TOP_K, MODEL_TOP_P, order="p-then-k")
    assert 3 <= (exp > 0).sum() < TOP_K and (wrong > 0).sum() == TOP_K  # the order shows in the draws
    return lm, prompt, logits, exp


def _first_tokens(result) -> np.ndarray:
    return np.array([c[0] for c in result.completion_ids])


@pytest.mark.slow
def test_shared_prefix_rollout_draws(peaked):
    lm, prompt, logits, exp = peaked
    cfg = RolloutConfig(group_size=500, temperature=TEMP, top_k=TOP_K, top_p=MODEL_TOP_P, max_new_tokens=1)
    r = shared_prefix_rollout(lm.model, lm.tokenizer, [prompt] * 4, cfg, seeds=[11, 12, 13, 14])
    check_draws(_first_tokens(r), exp)
    # old log-probs: the full softmax at the temperature, not the truncated distribution
    with torch.no_grad():
        full = torch.log_softmax(peaked_full_logits(lm, prompt) / TEMP, -1)  # suppressed tokens included
    toks = _first_tokens(r)
    got = torch.tensor([lp[0] for lp in r.logprobs])
    torch.testing.assert_close(got, full[toks].float(), atol=1e-4, rtol=0)
    truncated = np.log(exp[toks])
    assert np.abs(got.numpy() - truncated).min() > 1e-2  # not the log of the top-k/top-p renormalised probs


def peaked_full_logits(lm, prompt) -> torch.Tensor:
    """The unmasked logits of the first completion token (a plain forward)."""
    model = lm.model
    ids = torch.tensor([prompt.ids])
    v = video_inputs([prompt.video], "cpu")
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=v["pixel_values_videos"],
                video_grid_thw=v["video_grid_thw"],
                mm_token_type_ids=(ids == model.config.video_token_id).to(torch.int32) * 2)
    return out.logits[0, -1].float()


@pytest.mark.slow
def test_generate_rollout_draws_ignoring_the_checkpoints_generation_config(peaked):
    lm, prompt, logits, exp = peaked
    gc = lm.model.generation_config
    saved = (gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty, gc.do_sample)
    # What Qwen2-VL-7B-Instruct's generation_config.json ships: it must not reach the rollout.
    gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty, gc.do_sample = 1, 0.001, 0.01, 1.3, True
    try:
        cfg = RolloutConfig(group_size=300, temperature=TEMP, top_k=TOP_K, top_p=MODEL_TOP_P, max_new_tokens=1,
                            shared_prefix=False)
        r = rollout(lm.model, lm.tokenizer, [prompt] * 4, cfg, seeds=[21, 22, 23, 24])  # the prefix runs per sample
    finally:
        gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty, gc.do_sample = saved
    assert lm.model.generation_config.top_k == saved[0]  # put back after the call
    check_draws(_first_tokens(r), exp)


@pytest.mark.slow
def test_top_k_zero_means_no_top_k_in_both_paths(peaked):
    """rollout.top_k = 0 is off in the generate path too (transformers' own default would be top_k=50)."""
    lm, prompt, logits, _ = peaked
    exp = expected_distribution(logits.numpy(), TEMP, 10**6, 1.0)
    assert (exp > 0).sum() > 50
    for shared in (True, False):
        cfg = RolloutConfig(group_size=500, temperature=TEMP, top_k=0, top_p=1.0, max_new_tokens=1,
                            shared_prefix=shared)
        fn = shared_prefix_rollout if shared else rollout
        toks = _first_tokens(fn(lm.model, lm.tokenizer, [prompt] * 2, cfg, seeds=[1, 2]))
        kth50 = np.sort(logits.numpy())[::-1][49]
        assert (logits.numpy()[toks] < kth50).any(), "only top-50 tokens drawn: a top-k of 50 was applied"
        assert np.isfinite(logits.numpy()[toks]).all()  # suppressed vision tokens never drawn


@pytest.mark.slow
def test_old_logprobs_equal_a_full_forward_with_top_k_top_p(peaked):
    """Several tokens with top-k / top-p on: the rollout's log-probs (shared prefix) and the scoring pass the
    generate path's training uses both equal a full forward's log_softmax(logits / T)."""
    from fastebm.model.logprobs import suffix_logprobs

    lm, prompt, _, _ = peaked
    model = lm.model
    cfg = RolloutConfig(group_size=3, temperature=TEMP, top_k=TOP_K, top_p=MODEL_TOP_P, max_new_tokens=5)
    r = shared_prefix_rollout(model, lm.tokenizer, [prompt], cfg, seeds=[7])
    hf = rollout(model, lm.tokenizer, [prompt], RolloutConfig(**{**cfg.__dict__, "shared_prefix": False}), seeds=[7])
    scored = suffix_logprobs(model, [prompt], hf.completion_ids, hf.prompt_index, TEMP, kernel="eager",
                             shared_prefix=False)
    v = video_inputs([prompt.video], "cpu")
    for comps, lps in ((r.completion_ids, r.logprobs), (hf.completion_ids, scored.logprobs)):
        for c, lp in zip(comps, lps):
            ids = torch.tensor([prompt.ids + c])
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            pixel_values_videos=v["pixel_values_videos"], video_grid_thw=v["video_grid_thw"],
                            mm_token_type_ids=(ids == model.config.video_token_id).to(torch.int32) * 2)
            P = len(prompt.ids)
            full = torch.log_softmax(out.logits[0, P - 1:P - 1 + len(c)].double() / TEMP, -1)
            want = full[torch.arange(len(c)), torch.tensor(c)]
            torch.testing.assert_close(torch.as_tensor(lp, dtype=torch.float64), want, atol=1e-4, rtol=0)
