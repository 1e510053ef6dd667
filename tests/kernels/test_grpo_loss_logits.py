"""grpo_loss on logits (B, T, V): Triton kernels and the row-chunked CPU path against float64, and
parity with Liger's ``triton_grpo_loss`` (run under the same interpreter)."""
from __future__ import annotations

import pytest
import torch

from fastebm.kernels import grpo_loss, grpo_loss_ref

from kernel_helpers import BACKENDS, assert_3way, make_batch

CFGS = [
    dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.7, loss_type="grpo"),
    dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo", importance_sampling_level="sequence"),
    dict(beta=0.1, epsilon_low=0.1, epsilon_high=0.3, loss_type="dr_grpo", max_completion_length=9, delta=1.3),
    dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo", num_items_in_batch=20.0),
]


def _logits_batch(dtype, seed=0, B=3, T=7, V=1037):
    b = make_batch(B, T, 16, V, seed=seed)
    with torch.no_grad():
        b["logits"] = (b["hidden"] @ b["weight"].t()).to(dtype)
    return b


def _run(fn, b, cfg, **extra):
    x = b["logits"].detach().clone().requires_grad_()
    loss, m = fn(x, b["ids"], b["mask"], b["adv"], b["old"], b["ref"], **cfg, **extra)
    loss.backward()
    return loss.detach(), x.grad, m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", CFGS, ids=[c["loss_type"] for c in CFGS])
def test_logits_path_matches_float64(backend, dtype, cfg, monkeypatch):
    from fastebm.kernels import logits_grpo_loss as mod

    monkeypatch.setattr(mod, "BLOCK_V_INTERPRET", 128)   # 1037 = 8 * 128 + 13: a masked tail
    monkeypatch.setattr(mod, "CHUNK_ROWS", 4)            # several row chunks on the CPU path
    b = _logits_batch(dtype)
    out = _run(grpo_loss, b, cfg, backend=backend)
    ref = _run(grpo_loss_ref, b, cfg, upcast=True)
    low = _run(grpo_loss_ref, b, cfg)
    assert out[1].dtype == dtype and out[1].shape == b["logits"].shape
    assert_3way(out[0], ref[0], low[0], dtype, "loss")
    assert_3way(out[1], ref[1], low[1], dtype, "d_logits")
    assert_3way(out[2]["per_token_logps"], ref[2]["per_token_logps"], low[2]["per_token_logps"], dtype, "logps")
    # masked tokens get an exactly-zero gradient row
    assert out[1][b["mask"] == 0].abs().max().item() == 0.0


def test_logits_path_non_contiguous_input():
    # TRL-style logits[:, :-1] slices: the kernel follows the strides.
    b = _logits_batch(torch.float32, T=8)
    full = torch.cat([b["logits"], b["logits"][:, :1]], 1)
    cfg = CFGS[0]
    out, _ = grpo_loss(full[:, :-1], b["ids"], b["mask"], b["adv"], b["old"], b["ref"], backend="triton", **cfg)
    ref, _ = grpo_loss_ref(b["logits"], b["ids"], b["mask"], b["adv"], b["old"], b["ref"], upcast=True, **cfg)
    assert abs(out.item() - ref.item()) < 1e-5


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_parity_with_liger_triton_grpo_loss(loss_type, level):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    b = _logits_batch(torch.float32, seed=4, B=2, T=6, V=333)
    cfg = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.9, loss_type=loss_type,
               importance_sampling_level=level, max_completion_length=6 if loss_type == "dr_grpo" else None)
    ours = _run(grpo_loss, b, cfg, backend="triton")
    # Liger takes (B, T + 1, V) logits and drops the last position.
    x = torch.cat([b["logits"], torch.zeros_like(b["logits"][:, :1])], 1).contiguous().requires_grad_()
    loss, metrics = triton_grpo_loss(x, b["old"], b["ref"], b["ids"], b["adv"], b["mask"].contiguous(),
                                     temperature=0.9, beta=0.04, eps_low=0.2, eps_high=0.28, inplace=False,
                                     loss_type=loss_type, max_completion_length=cfg["max_completion_length"],
                                     importance_sampling_level=level, reduce=True)
    loss.backward()
    torch.testing.assert_close(ours[0], loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], x.grad[:, :-1], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours[2]["kl"], metrics[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[2]["clip_ratio"], metrics[1], atol=1e-6, rtol=1e-5)
