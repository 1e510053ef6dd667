"""Every TRL 1.16 / Liger 0.8.5 loss type and option in fastebm's fused loss (issue 15).

The matrix: loss type x {token, sequence} importance sampling x {delta unset, set} x {bias-corrected
KL off, on} x {beta 0, 0.04}, on an odd shape (B = 3, T = 7, H = 24, V = 131, temperature 0.8,
ragged masks and a fully masked row), loss and both gradients, in float64, against

- fastebm's plain-torch reference (``fused_linear_grpo_loss_ref``, full-precision chunked logits),
- TRL 1.16's own ``GRPOTrainer._compute_loss`` run on full float64 logits (``trl_compute_loss``:
  TRL's code, not ours, is the semantics being matched), with its logged KL / clip metrics,
- Liger 0.8.5's ``LigerFusedLinearGRPOLoss`` through fastebm's drop-in ``FusedLinearGRPOLoss``,
  where Liger allows the combination (it refuses sequence level for cispo / sapo / vespo) and
  agrees with TRL (luspo: see ``test_luspo_follows_trl_where_liger_differs``). Liger computes its
  log-probs in fp32 whatever the input dtype, so that comparison has fp32 tolerances.

The chunked PyTorch path runs every combination; the Triton kernels (under the interpreter, slow)
a subset, in fp32 against the float64 reference with STYLE.md's three-way rule.
"""
from __future__ import annotations

import inspect
import itertools

import pytest
import torch

from fastebm.kernels import (FusedLinearGRPOLoss, GRPOLossOptions, fused_linear_grpo_loss, fused_linear_grpo_loss_ref,
                             grpo_loss, grpo_loss_ref, linear_logprobs, token_logprobs_ref)
from fastebm.kernels.grpo_semantics import GLOBAL_TOKEN_NORMALISED, LOSS_TYPES

from kernel_helpers import assert_3way, make_batch, trl_compute_loss

ALL_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
SHAPE = (4, 9, 24, 131)
TEMPERATURE = 0.8
MAX_LEN = 9
LIGER_TOKEN_ONLY = ("cispo", "sapo", "vespo")
TIGHT = dict(rtol=1e-9, atol=1e-12)        # float64 against float64
LIGER = dict(rtol=1e-4, atol=2e-6)         # float64 against Liger's fp32 internals


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _options(loss_type, level="token", delta=None, bias_kl=False, beta=0.04, **kw):
    # cispo's epsilon_high is the raw weight cap (ScaleRL's eps_max): put it inside the ratio range.
    eps_high = 1.2 if loss_type == "cispo" else 0.28
    return GRPOLossOptions(beta=beta, epsilon_low=0.2, epsilon_high=eps_high, temperature=TEMPERATURE,
                           loss_type=loss_type, importance_sampling_level=level, delta=delta,
                           max_completion_length=MAX_LEN, use_bias_correction_kl=bias_kl, **kw)


def _batch64(seed=21, shape=SHAPE):
    """float64 batch; old / reference log-probs near the policy's own at TEMPERATURE, so the ratios
    straddle the trust region; advantages of both signs on the rows that have tokens."""
    b = make_batch(*shape, dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    logp = token_logprobs_ref(b["hidden"], b["weight"], b["ids"], TEMPERATURE)
    b["old"] = logp + 0.45 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    b["ref"] = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    b["adv"] = torch.tensor([-0.9, 1.1, -0.4, -0.7], dtype=torch.float64)[:shape[0]]
    return b


def _fused(b, options, backend="torch", fn=fused_linear_grpo_loss, **kw):
    h = b["hidden"].detach().clone().requires_grad_()
    w = b["weight"].detach().clone().requires_grad_()
    loss, metrics = fn(h, w, b["ids"], b["mask"], b["adv"], b["old"], b["ref"] if options.beta else None, options,
                       backend=backend, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


def _trl(b, options, **kw):
    return trl_compute_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], b["old"],
                            b["ref"] if options.beta else None, options, **kw)


def _module(cls, b, options, **extra_init):
    """Liger's module or fastebm's drop-in, built from the same Liger keywords, forward on ``b``."""
    o = options
    init = dict(beta=o.beta, use_ref_model=o.beta != 0, epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high,
                loss_type=o.loss_type, max_completion_length=o.max_completion_length,
                importance_sampling_level=o.importance_sampling_level, temperature=o.temperature, delta=o.delta,
                use_bias_correction_kl=o.use_bias_correction_kl, **extra_init)
    h = b["hidden"].detach().clone().requires_grad_()
    w = b["weight"].detach().clone().requires_grad_()
    loss, metrics = cls(compiled=False, **init)(h, w, b["ids"], b["mask"], b["adv"], ref_per_token_logps=b["ref"],
                                                old_per_token_logps=b["old"])
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


def _close(ours, theirs, tol, what):
    for name, a, r in zip(("loss", "d_hidden", "d_weight"), ours[:3], theirs[:3]):
        assert torch.isfinite(a).all(), f"{what}: {name} not finite"
        torch.testing.assert_close(a.double(), r.double(), **tol, msg=lambda m: f"{what}: {name}: {m}")


def _liger_agrees_with_trl(o):
    # Liger's luspo multiplies the UNMASKED per-token loss by the lengths and divides by B * T; TRL
    # 1.16 sums the masked per-token loss per sequence. Same value only when the per-token loss is
    # one number per sequence: sequence level without a per-token KL.
    return o.loss_type != "luspo" or (o.importance_sampling_level == "sequence" and o.beta == 0)


MATRIX = list(itertools.product(ALL_TYPES, ["token", "sequence"], [None, 1.4], [False, True], [0.0, 0.04]))


def test_matrix_covers_every_loss_type():
    assert set(ALL_TYPES) == set(LOSS_TYPES) and len(MATRIX) == 8 * 2 * 2 * 2 * 2


@pytest.mark.parametrize("loss_type,level,delta,bias_kl,beta", MATRIX,
                         ids=[f"{t}-{lv}-delta{d}-biaskl{int(k)}-beta{b}" for t, lv, d, k, b in MATRIX])
def test_float64_parity_reference_trl_liger(loss_type, level, delta, bias_kl, beta):
    o = _options(loss_type, level, delta, bias_kl, beta)
    b = _batch64()
    ours = _fused(b, o)
    _close(ours, _fused(b, o, fn=fused_linear_grpo_loss_ref, upcast=True), TIGHT, "reference")

    trl = _trl(b, o)
    _close(ours, trl, TIGHT, "TRL")
    metrics = trl[3]    # the metrics are fp32 scalars by the kernels' contract
    if beta:
        assert abs(ours[3]["kl"].item() - metrics["kl"]) < 1e-6 * max(1.0, metrics["kl"])
    if level == "token" and loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        assert abs(ours[3]["clip_ratio"].item() - metrics["clip_ratio/region_mean"]) < 1e-6
    if level == "token" and loss_type == "cispo":
        assert abs(ours[3]["clip_ratio"].item() - metrics["cispo_clip_ratio"]) < 1e-6

    if level == "sequence" and loss_type in LIGER_TOKEN_ONLY:
        return  # Liger refuses it (test_liger_refusals_are_ours_naming_the_keyword)
    if not _liger_agrees_with_trl(o):
        return
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    mine = _module(FusedLinearGRPOLoss, b, o, backend="torch")
    liger = _module(LigerFusedLinearGRPOLoss, b, o)
    _close(mine, liger, LIGER, "Liger")
    assert len(mine[3]) == len(liger[3]) == (2 if beta else 1)
    for a, m in zip(mine[3], liger[3]):
        torch.testing.assert_close(a.double(), m.double(), **LIGER)


def test_the_matrix_exercises_the_options():
    # Guards on the fixture: ratios straddle the trust region and the delta cap, the options change
    # the result, so the parity above could have failed.
    b = _batch64()
    base = _fused(b, _options("grpo"))
    assert 0.05 < base[3]["clip_ratio"].item() < 0.95
    ratio = torch.exp(base[3]["per_token_logps"] - b["old"])[b["mask"].bool()]
    assert (ratio > 1.4).any() and (ratio < 1.4).any()
    live_adv = b["adv"][b["mask"].sum(-1) > 0]
    assert (live_adv > 0).any() and (live_adv < 0).any()
    for changed in (_options("grpo", delta=1.4), _options("grpo", bias_kl=True), _options("grpo", level="sequence"),
                    _options("cispo"), _options("sapo"), _options("luspo"), _options("vespo")):
        assert not torch.allclose(_fused(b, changed)[1], base[1]), changed
    cispo_w = torch.clamp(ratio, max=1.2)
    assert (cispo_w < 1.2).any() and (cispo_w == 1.2).any()


# --------------------------------------------------------------------------------------------- #
# Per-call options against TRL's own code: rollout-engine ratio, entropy quantile, off-policy mask,
# the global token count, per-token advantages
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("loss_type", ALL_TYPES)
@pytest.mark.parametrize("shape", ["token", "sequence"])
def test_vllm_is_ratio_matches_trl(loss_type, shape):
    b = _batch64(seed=5)
    B, T = b["ids"].shape
    g = torch.Generator().manual_seed(1)
    # TRL's ratio: exp(old - sampling) per token (masked: exactly 1) or per sequence, truncated at 3.
    if shape == "token":
        ratio = torch.exp(0.2 * torch.randn(B, T, generator=g, dtype=torch.float64) * b["mask"]).clamp(max=3.0)
    else:
        ratio = torch.exp(0.3 * torch.randn(B, 1, generator=g, dtype=torch.float64)).clamp(max=3.0)
    o = _options(loss_type, bias_kl=True)
    ours = _fused(b, o, vllm_is_ratio=ratio)
    _close(ours, _trl(b, o, vllm_is_ratio=ratio), TIGHT, "TRL")
    if loss_type == "vespo" or shape == "sequence":
        return
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    if not _liger_agrees_with_trl(o):
        return
    liger = LigerFusedLinearGRPOLoss(compiled=False, beta=o.beta, epsilon_high=o.epsilon_high, loss_type=loss_type,
                                     max_completion_length=MAX_LEN, temperature=TEMPERATURE, use_bias_correction_kl=True)
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    loss, _ = liger(h, w, b["ids"], b["mask"], b["adv"], ref_per_token_logps=b["ref"], old_per_token_logps=b["old"],
                    vllm_is_ratio=ratio)
    loss.backward()
    _close(ours, (loss, h.grad, w.grad), LIGER, "Liger")


@pytest.mark.parametrize("loss_type", ALL_TYPES)
@pytest.mark.parametrize("quantile", [0.0, 0.4])
def test_top_entropy_quantile_matches_trl(loss_type, quantile):
    b = _batch64(seed=6)
    o = _options(loss_type, top_entropy_quantile=quantile)
    ours = _fused(b, o)
    _close(ours, _trl(b, o), TIGHT, "TRL")
    _close(ours, _fused(b, o, fn=fused_linear_grpo_loss_ref, upcast=True), TIGHT, "reference")
    # the entropies come out of the fused forward: the reference's, and TRL's logged mean
    ent = ours[3]["entropy"]
    _, ref_ent = token_logprobs_ref(b["hidden"], b["weight"], b["ids"], TEMPERATURE, return_entropy=True)
    torch.testing.assert_close(ent, ref_ent, **TIGHT)
    # the quantile did something: fewer tokens train than without it
    assert not torch.allclose(ours[1], _fused(b, _options(loss_type))[1])


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_off_policy_mask_matches_trl(loss_type):
    b = _batch64(seed=8)
    g = torch.Generator().manual_seed(3)
    # The rollout engine's log-probs: row 0 (advantage < 0) drifted above the policy by 0.3 on
    # average (dropped at threshold 0.05), row 2 (advantage < 0) below it (kept).
    logp = token_logprobs_ref(b["hidden"], b["weight"], b["ids"], TEMPERATURE)
    shift = torch.tensor([0.3, 0.3, -0.3, 0.0], dtype=torch.float64)[:, None]
    sampling = logp + shift + 0.05 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    sampling[1, 2] = float("nan")              # a token the engine could not score: no divergence
    o = _options(loss_type, off_policy_mask_threshold=0.05)
    ours = _fused(b, o, sampling_per_token_logps=sampling)
    _close(ours, _trl(b, o, sampling_logps=sampling), TIGHT, "TRL with sampling log-probs")
    # without sampling log-probs both fall back to the old log-probs
    _close(_fused(b, o), _trl(b, o), TIGHT, "TRL, old log-probs as the sampling ones")
    # guard: the mask drops exactly row 0
    from fastebm.kernels.grpo_semantics import off_policy_sequence_mask

    keep = off_policy_sequence_mask(b["adv"][:, None], ours[3]["per_token_logps"], sampling, b["mask"], 0.05)
    assert keep.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("loss_type", GLOBAL_TOKEN_NORMALISED)
def test_num_items_in_batch_matches_trl(loss_type):
    b = _batch64(seed=9)
    n = b["mask"].sum() + 11.0                   # the global count (other micro-batches, other ranks)
    o = _options(loss_type)
    ours = _fused(b, o, num_items_in_batch=n)
    _close(ours, _trl(b, o, num_items_in_batch=n), TIGHT, "TRL")
    assert not torch.allclose(ours[0], _fused(b, o)[0])


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_every_option_at_once_matches_trl(loss_type):
    b = _batch64(seed=10)
    B, T = b["ids"].shape
    g = torch.Generator().manual_seed(4)
    ratio = torch.exp(0.2 * torch.randn(B, T, generator=g, dtype=torch.float64) * b["mask"])
    sampling = b["old"] + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    o = _options(loss_type, level="sequence" if loss_type in ("grpo", "luspo") else "token", delta=1.4,
                 bias_kl=True, top_entropy_quantile=0.5, off_policy_mask_threshold=0.0,
                 sapo_temperature_pos=0.7, sapo_temperature_neg=1.4, vespo_k_pos=1.5, vespo_lambda_pos=2.5,
                 vespo_k_neg=2.5, vespo_lambda_neg=1.5)
    n = b["mask"].sum() + 3.0
    kw = dict(vllm_is_ratio=ratio, num_items_in_batch=n)
    ours = _fused(b, o, sampling_per_token_logps=sampling, **kw)
    _close(ours, _trl(b, o, sampling_logps=sampling, **kw), TIGHT, "TRL")
    _close(ours, _fused(b, o, fn=fused_linear_grpo_loss_ref, upcast=True, sampling_per_token_logps=sampling, **kw),
           TIGHT, "reference")


def test_per_token_advantages_match_trl():
    b = _batch64(seed=12)
    g = torch.Generator().manual_seed(5)
    b["adv"] = torch.randn(b["ids"].shape, generator=g, dtype=torch.float64)   # (B, T), as TRL subclasses pass
    for loss_type in ALL_TYPES:
        o = _options(loss_type, bias_kl=True, off_policy_mask_threshold=0.0)
        _close(_fused(b, o), _trl(b, o), TIGHT, f"TRL {loss_type}")


# --------------------------------------------------------------------------------------------- #
# Triton (interpreter) subset, the logits path, the entropy of the training forward
# --------------------------------------------------------------------------------------------- #

TRITON_SUBSET = [
    dict(loss_type="cispo", bias_kl=True, top_entropy_quantile=0.5),
    dict(loss_type="sapo", delta=1.4, off_policy_mask_threshold=0.0),
    dict(loss_type="luspo", level="sequence", beta=0.0),
    dict(loss_type="vespo", bias_kl=True),
    dict(loss_type="dapo", level="sequence", delta=1.4, bias_kl=True, top_entropy_quantile=0.3),
]


@pytest.mark.parametrize("cfg", TRITON_SUBSET, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_triton_subset_three_way(cfg, small_tiles):
    o = _options(**cfg)
    b32 = make_batch(*SHAPE, seed=13)
    out = _fused(b32, o, backend="triton")
    lowp = _fused(b32, o, fn=fused_linear_grpo_loss_ref)
    ref64 = _fused(b32, o, fn=fused_linear_grpo_loss_ref, upcast=True)
    for i, name in enumerate(["loss", "d_hidden", "d_weight"]):
        assert_3way(out[i], ref64[i], lowp[i], torch.float32, name)
    if o.top_entropy_quantile < 1:
        assert_3way(out[3]["entropy"], ref64[3]["entropy"], lowp[3]["entropy"], torch.float32, "entropy")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_training_forward_entropy_is_free_of_gradient(backend, small_tiles):
    # return_entropy changes nothing about logp or its gradient; the entropy equals the reference's.
    b = make_batch(2, 5, 24, 203, seed=14)
    grads = []
    for with_entropy in (False, True):
        h = b["hidden"].clone().requires_grad_()
        w = b["weight"].clone().requires_grad_()
        out = linear_logprobs(h, w, b["ids"], 0.9, backend=backend, return_entropy=with_entropy)
        lp = out[0] if with_entropy else out
        if with_entropy:
            assert not out[1].requires_grad and out[1].shape == b["ids"].shape
            _, ref_ent = token_logprobs_ref(b["hidden"], b["weight"], b["ids"], 0.9, return_entropy=True, upcast=True)
            assert (out[1].double() - ref_ent).abs().max() < 1e-5
        (lp * b["mask"]).sum().backward()
        grads.append((lp.detach(), h.grad, w.grad))
    for a, r in zip(*grads):
        assert torch.equal(a, r)


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_logits_path_takes_every_option(loss_type):
    b = _batch64(seed=15)
    o = _options(loss_type, level="sequence", bias_kl=True, top_entropy_quantile=0.5, off_policy_mask_threshold=0.0)
    ours = _fused(b, o)
    for fn in (grpo_loss, grpo_loss_ref):
        x = (b["hidden"] @ b["weight"].t()).requires_grad_()
        kw = dict(backend="torch") if fn is grpo_loss else {}
        loss, m = fn(x, b["ids"], b["mask"], b["adv"], b["old"], b["ref"], o, **kw)
        loss.backward()
        torch.testing.assert_close(loss.double(), ours[0], **TIGHT)
        torch.testing.assert_close(x.grad @ b["weight"], ours[1], **TIGHT)   # chain rule back to hidden


# --------------------------------------------------------------------------------------------- #
# The drop-in's signature and refusals, as Liger's
# --------------------------------------------------------------------------------------------- #


def _params(fn, skip=("self",)):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
            if p.name not in skip and p.kind is not p.KEYWORD_ONLY]


def test_dropin_signature_is_liger_0_8_5():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    assert _params(FusedLinearGRPOLoss.__init__) == _params(LigerFusedLinearGRPOLoss.__init__)
    assert _params(FusedLinearGRPOLoss.forward) == _params(LigerFusedLinearGRPOLoss.forward)
    # fastebm's extras (the backend and the backward strategy) are keyword-only
    extra = [p.name for p in inspect.signature(FusedLinearGRPOLoss.__init__).parameters.values()
             if p.kind is p.KEYWORD_ONLY]
    assert extra == ["backend", "backward", "backward_chunk_mb", "deterministic"]


@pytest.mark.parametrize("loss_type", LIGER_TOKEN_ONLY)
def test_liger_refusals_are_ours_naming_the_keyword(loss_type):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b = make_batch(2, 4, 16, 50, seed=2)
    liger = LigerFusedLinearGRPOLoss(compiled=False, loss_type=loss_type, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="Sequence-level importance sampling is not supported"):
        liger(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], ref_per_token_logps=b["ref"])
    with pytest.raises(ValueError, match=rf"importance_sampling_level='sequence' is not supported for "
                                         rf"loss_type='{loss_type}'"):
        FusedLinearGRPOLoss(loss_type=loss_type, importance_sampling_level="sequence")
    for kw, name in ((dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"), (dict(delta=-1.0), "delta"),
                     (dict(loss_type="dr_grpo"), "max_completion_length"), (dict(vespo_k_pos=float("nan")),
                                                                          "vespo_k_pos")):
        with pytest.raises(ValueError, match=name):
            FusedLinearGRPOLoss(**kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilon'"):
        FusedLinearGRPOLoss(epsilon=0.2)


def test_dropin_vllm_is_ratio_shapes_are_checked():
    b = make_batch(2, 4, 16, 50, seed=2)
    mod = FusedLinearGRPOLoss(beta=0.0, backend="torch")
    per_seq = mod(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], vllm_is_ratio=torch.full((2,), 0.5))[0]
    as_b1 = mod(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], vllm_is_ratio=torch.full((2, 1), 0.5))[0]
    assert torch.equal(per_seq, as_b1)
    with pytest.raises(ValueError, match=r"vllm_is_ratio must be \(2,\), \(2, 1\) or \(2, 4\)"):
        mod(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], vllm_is_ratio=torch.ones(2, 3))


def test_luspo_follows_trl_where_liger_differs():
    # The one loss where Liger 0.8.5 and TRL 1.16 disagree (token level, or any per-token KL): fastebm
    # matches TRL (test_float64_parity_reference_trl_liger) and so differs from Liger here.
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b = _batch64(seed=16)
    o = _options("luspo")
    mine = _module(FusedLinearGRPOLoss, b, o, backend="torch")
    _close(mine, _trl(b, o), TIGHT, "TRL")
    liger = _module(LigerFusedLinearGRPOLoss, b, o)
    assert abs(mine[0].item() - liger[0].item()) > 1e-3 * abs(mine[0].item())


def test_new_options_are_checked_naming_the_field():
    for field, value in (("top_entropy_quantile", 1.5), ("sapo_temperature_pos", -1.0),
                         ("off_policy_mask_threshold", float("inf")), ("use_bias_correction_kl", 1),
                         ("vespo_lambda_neg", "2")):
        with pytest.raises(ValueError, match=rf"GRPOLossOptions\.{field} must be"):
            GRPOLossOptions(**{field: value})
    b = make_batch(2, 4, 16, 50, seed=2)
    with pytest.raises(ValueError, match="top_entropy_quantile < 1 needs the per-token entropies"):
        from fastebm.kernels import grpo_loss_from_logps

        grpo_loss_from_logps(b["old"], None, None, b["adv"], b["mask"], GRPOLossOptions(top_entropy_quantile=0.5))
