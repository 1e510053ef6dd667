"""Gradient accumulation: the trainer splits a step's sequences into micro-batches and scales each
micro-batch's loss (``fastebm.grpo.loss.micro_batch_scale``) so that the scaled losses, and their
gradients, add up to those of the whole batch, for every loss type."""
from __future__ import annotations

import pytest
import torch

from fastebm.grpo.loss import micro_batch_scale
from fastebm.kernels import GRPOLossOptions, grpo_loss_from_logps
from fastebm.kernels.grpo_semantics import LOSS_TYPES

SPLITS = [(0, 2), (2, 5), (5, 7)]  # uneven micro-batches of a 7-sequence batch


def _batch(seed=0, B=7, T=9):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 0, 7, 3, 9])  # ragged, one sequence fully masked
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.float64)
    return logps, old, ref, adv, mask


# cispo, sapo and vespo run at token level only (as in Liger)
CASES = [(t, lv) for t in LOSS_TYPES for lv in ("token", "sequence") if lv == "token" or t not in ("cispo", "sapo", "vespo")]


@pytest.mark.parametrize("loss_type,level", CASES)
def test_scaled_micro_batches_add_up_to_the_whole_batch(loss_type, level):
    logps, old, ref, adv, mask = _batch()
    opts = GRPOLossOptions(beta=0.04, loss_type=loss_type, importance_sampling_level=level, max_completion_length=9,
                           epsilon_high=5.0 if loss_type == "cispo" else 0.2)
    total_tokens = int(mask.sum())

    whole_in = logps.clone().requires_grad_(True)
    whole = grpo_loss_from_logps(whole_in, old, ref, adv, mask, opts, num_items_in_batch=total_tokens).loss
    whole.backward()

    parts_in = logps.clone().requires_grad_(True)
    summed = 0.0
    for a, b in SPLITS:
        out = grpo_loss_from_logps(parts_in[a:b], old[a:b], ref[a:b], adv[a:b], mask[a:b], opts,
                                   num_items_in_batch=total_tokens).loss
        scale = micro_batch_scale(loss_type, sequences=b - a, total_sequences=len(logps),
                                  tokens=int(mask[a:b].sum()), total_tokens=total_tokens)
        summed = summed + out * scale
    summed.backward()
    torch.testing.assert_close(summed, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts_in.grad, whole_in.grad, rtol=1e-12, atol=1e-12)


def test_every_loss_type_has_a_scale():
    for loss_type in LOSS_TYPES:
        micro_batch_scale(loss_type, sequences=1, total_sequences=2, tokens=3, total_tokens=5)
    with pytest.raises(ValueError, match="loss_type"):
        micro_batch_scale("ppo", sequences=1, total_sequences=2, tokens=3, total_tokens=5)
