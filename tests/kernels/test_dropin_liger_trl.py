"""FusedLinearGRPOLoss as a drop-in: against Liger's LigerFusedLinearGRPOLoss (same keywords, same
return structure) and against TRL's own GRPOTrainer._compute_loss on the same batch, for every loss
type: loss, d hidden, d weight and the KL / clip metrics."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fastebm.kernels import FusedLinearGRPOLoss

from kernel_helpers import make_batch

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def _ours(b, backend, **init):
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    mod = FusedLinearGRPOLoss(backend=backend, **init)
    loss, metrics = mod(_input=h, lin_weight=w, selected_token_ids=b["ids"], attention_mask=b["mask"],
                        advantages=b["adv"], ref_per_token_logps=b["ref"], old_per_token_logps=b["old"],
                        num_items_in_batch=b.get("num_items"))
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level,beta", [("token", 0.04), ("sequence", 0.0)])
def test_matches_liger_fused_linear_grpo(backend, loss_type, level, beta, small_tiles):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b = make_batch(3, 6, 24, 517, seed=9)
    init = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, temperature=0.8,
                importance_sampling_level=level, max_completion_length=8)
    ours = _ours(b, backend, **init)
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    liger = LigerFusedLinearGRPOLoss(compiled=False, **init)
    loss, metrics = liger(_input=h, lin_weight=w, selected_token_ids=b["ids"], attention_mask=b["mask"],
                          advantages=b["adv"], ref_per_token_logps=b["ref"], old_per_token_logps=b["old"])
    loss.backward()
    assert len(ours[3]) == len(metrics) == (2 if beta else 1)
    torch.testing.assert_close(ours[0], loss.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], h.grad, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(ours[2], w.grad, atol=2e-6, rtol=1e-4)
    for a, m in zip(ours[3], metrics):
        torch.testing.assert_close(a, m, atol=1e-6, rtol=1e-5)


def _trl_stub(loss_type, level, beta, delta, max_len):
    """The attributes GRPOTrainer._compute_loss reads, for one process, no vLLM, no entropy tricks."""
    acc = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                          reduce=lambda x, reduction="sum": x, sync_gradients=True)
    args = SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1)
    return SimpleNamespace(
        loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
        max_completion_length=max_len, args=args, accelerator=acc, model=SimpleNamespace(training=True),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)})


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("delta", [None, 1.3])
def test_matches_trl_grpo_trainer_compute_loss(loss_type, level, delta):
    """TRL's own loss code runs on log-probs computed with full logits (the stubbed
    ``_get_per_token_logps_and_entropies``); ours runs from hidden states on the Triton kernels."""
    from trl import GRPOTrainer

    b = make_batch(3, 6, 24, 517, seed=13)
    b["num_items"] = torch.tensor(b["mask"].sum().item() + 5.0, device=b["mask"].device)   # global != local (grad accum)
    beta, temperature, max_len = 0.04, 0.8, 8
    stub = _trl_stub(loss_type, level, beta, delta, max_len)
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        logps = torch.log_softmax((h @ w.t()) / temperature, -1)               # full logits: TRL's path
        lp = logps.gather(-1, b["ids"][..., None]).squeeze(-1)
        return lp, -(logps.exp() * logps).sum(-1), None

    stub._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    B, T = b["ids"].shape
    inputs = dict(prompt_ids=torch.zeros(B, 2, dtype=torch.long, device=h.device),
                  prompt_mask=torch.ones(B, 2, device=h.device),
                  completion_ids=b["ids"], completion_mask=b["mask"], advantages=b["adv"],
                  old_per_token_logps=b["old"], ref_per_token_logps=b["ref"], num_items_in_batch=b["num_items"])
    trl_loss = GRPOTrainer._compute_loss(stub, None, inputs)
    trl_loss.backward()

    ours = _ours(b, "triton", beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                 temperature=temperature, importance_sampling_level=level, max_completion_length=max_len,
                 delta=delta)
    torch.testing.assert_close(ours[0], trl_loss.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], h.grad, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(ours[2], w.grad, atol=2e-6, rtol=1e-4)
    kl, clip = ours[3]
    assert abs(kl.item() - stub._metrics["train"]["kl"][-1]) < 1e-6
    if level == "token":
        # At sequence level TRL averages the clip flag over sequences, Liger (and we, as its drop-in)
        # over tokens: a metric convention, not a loss difference.
        assert abs(clip.item() - stub._metrics["train"]["clip_ratio/region_mean"][-1]) < 1e-6


def test_liger_style_ref_input_and_no_ref():
    b = make_batch(2, 5, 16, 200, seed=3)
    init = dict(beta=0.04, loss_type="bnpo", backend="torch")
    # ref log-probs computed from ref_input / ref_weight equal the ones passed explicitly
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone()
    ref_h, ref_w = b["hidden"] + 0.1, b["weight"] * 0.9
    from fastebm.kernels import token_logprobs
    explicit = FusedLinearGRPOLoss(**init)(h, w, b["ids"], b["mask"], b["adv"],
                                           ref_per_token_logps=token_logprobs(ref_h, ref_w, b["ids"]))
    implicit = FusedLinearGRPOLoss(**init)(h, w, b["ids"], b["mask"], b["adv"], ref_input=ref_h, ref_weight=ref_w)
    torch.testing.assert_close(explicit[0], implicit[0])
    # no reference at all: like Liger, KL (and its gradient) are zero, the metric slot remains
    loss, (kl, clip) = FusedLinearGRPOLoss(**init)(h, w, b["ids"], b["mask"], b["adv"])
    assert kl.item() == 0.0
