"""GRPOLossOptions.kl_clamp: the k3 KL's log-ratio ``ref - logp`` clamped to [-c, c] (EBM-RL's released
run: 10), checked against a float64 plain-torch computation written here: forward, the KL metric and
every gradient, on odd shapes with a fully masked row, temperature != 1, and log-ratios far outside
the range on both sides (so the clamp is active; without it the numbers differ)."""
from __future__ import annotations

import pytest
import torch

from fastebm.config import GRPOConfig
from fastebm.grpo.loss import compute_grpo_loss, loss_options
from fastebm.kernels import GRPOLossOptions, fused_linear_grpo_loss, grpo_loss_reference

from kernel_helpers import assert_3way, make_batch

B, T, H, V = 3, 7, 16, 97
TEMP, BETA, CLAMP = 0.7, 0.3, 2.5


def _batch(dtype):
    b = make_batch(B, T, H, V, dtype=dtype, seed=11)
    # Reference log-probs far from the policy's on some tokens: log-ratios of about +-6 (> CLAMP).
    g = torch.Generator().manual_seed(3)
    push = torch.where(torch.rand(B, T, generator=g) < 0.5, 6.0, -6.0) * (torch.rand(B, T, generator=g) < 0.6)
    b["ref"] = b["ref"] + push
    return b


def _plain(hidden, weight, ids, mask, adv, ref, clamp):
    """The GRPO loss with mu = 1 (ratio 1, no old log-probs) and a clamped k3 KL, written out."""
    logp = torch.log_softmax((hidden @ weight.t()) / TEMP, -1).gather(-1, ids[..., None]).squeeze(-1)
    d = ref.to(logp.dtype) - logp
    if clamp is not None:
        d = d.clamp(-clamp, clamp)
    kl = d.exp() - d - 1
    ratio = torch.exp(logp - logp.detach())
    per_token = -ratio * adv.to(logp.dtype)[:, None] + BETA * kl
    m = mask.to(logp.dtype)
    loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    kl_mean = (kl.detach() * m).sum() / m.sum()
    return loss, kl_mean


def _run(fn, b, dtype):
    h = b["hidden"].to(dtype).clone().requires_grad_()
    w = b["weight"].to(dtype).clone().requires_grad_()
    loss, kl = fn(h, w)
    loss.backward()
    return loss.detach(), kl.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", ["torch", "triton", "eager"])
def test_kl_clamp_matches_float64(backend):
    b = _batch(torch.float32)
    args = (b["ids"], b["mask"], b["adv"])
    d = b["ref"].double() - torch.log_softmax((b["hidden"].double() @ b["weight"].double().t()) / TEMP,
                                              -1).gather(-1, b["ids"][..., None]).squeeze(-1)
    live = b["mask"].bool()
    assert (d[live] > CLAMP).any() and (d[live] < -CLAMP).any()  # the clamp is active on both sides

    ref64 = _run(lambda h, w: _plain(h, w, *args, b["ref"].double(), CLAMP), b, torch.float64)
    torch32 = _run(lambda h, w: _plain(h, w, *args, b["ref"], CLAMP), b, torch.float32)
    opts = GRPOLossOptions(beta=BETA, temperature=TEMP, kl_clamp=CLAMP)
    if backend == "eager":
        def fn(h, w):
            out = grpo_loss_reference(h, w, *args, None, b["ref"], opts)
            return out.loss, out.kl
    else:
        def fn(h, w):
            loss, m = fused_linear_grpo_loss(h, w, *args, None, b["ref"], opts, backend=backend)
            return loss, m["kl"]
    got = _run(fn, b, torch.float32)
    for name, x, r, t in zip(("loss", "kl", "d_hidden", "d_weight"), got, ref64, torch32):
        assert_3way(x, r, t, torch.float32, name)
    # Not vacuous: without the clamp the loss, the KL and the gradients are different numbers.
    free = _run(lambda h, w: _plain(h, w, *args, b["ref"].double(), None), b, torch.float64)
    assert abs(float(free[0]) - float(ref64[0])) > 1e-2 and abs(float(free[1]) - float(ref64[1])) > 1e-2
    assert (free[2] - ref64[2]).abs().max() > 1e-3


def test_kl_clamp_is_an_option_checked_and_mapped_from_the_config():
    with pytest.raises(ValueError, match=r"GRPOLossOptions\.kl_clamp must be"):
        GRPOLossOptions(kl_clamp=0.0)
    with pytest.raises(ValueError, match=r"GRPOLossOptions\.kl_clamp must be"):
        GRPOLossOptions(kl_clamp=float("inf"))
    assert loss_options(GRPOConfig(kl_clamp=10.0), 1.0, 64).kl_clamp == 10.0
    assert loss_options(GRPOConfig(), 1.0, 64).kl_clamp is None
    # the trainer's entry point passes it through to the math
    b = _batch(torch.float64)
    clamped = compute_grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], None, b["ref"].double(),
                                loss_options(GRPOConfig(beta=BETA, kl_clamp=CLAMP), TEMP, T), kernel="eager")
    plain, kl = _plain(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], b["ref"].double(), CLAMP)
    assert float(clamped.loss) == pytest.approx(float(plain), rel=1e-12)
    assert float(clamped.kl) == pytest.approx(float(kl), rel=1e-6)
