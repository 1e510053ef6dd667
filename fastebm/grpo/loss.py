"""The GRPO loss front-end.

``compute_grpo_loss`` takes the policy's *hidden states* of completion tokens and the lm_head
weight, never logits. ``kernel="fused"`` runs ``fastebm.kernels.fused_linear_grpo_loss`` (Triton on
CUDA, a memory-bounded path elsewhere); ``kernel="eager"`` runs the plain-torch path below,
chunked over tokens so that full (tokens x vocabulary) logits are never held at once either.

The per-token loss and the reductions follow TRL's ``GRPOTrainer._compute_loss`` exactly:

    log_ratio = logp - old_logp                      (old_logp = logp.detach() when absent)
    token IS:     w = exp(log_ratio)
    sequence IS:  w = exp(masked mean of log_ratio over the sequence), broadcast to tokens
    loss_t = -min(clamp(w, max=delta) * A, clamp(w, 1 - eps_low, 1 + eps_high) * A)
    loss_t *= vllm_is_ratio                           (when given)
    loss_t += beta * (exp(ref - logp) - (ref - logp) - 1)     (k3 KL, when beta != 0)

    grpo:    mean over sequences of (masked token mean per sequence)
    bnpo:    masked token sum / number of unmasked tokens
    dr_grpo: masked token sum / (batch size * max_completion_length)
    dapo:    masked token sum / num_items_in_batch  (global count of completion tokens)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class LossOutput:
    loss: torch.Tensor                 # scalar, differentiable
    per_token_logps: torch.Tensor      # (B, T) fp32, detached
    kl: torch.Tensor                   # scalar: masked mean k3 KL (0 when beta == 0 and no ref)
    clip_ratio: torch.Tensor           # scalar: fraction of unmasked tokens whose ratio was clipped


def per_token_grpo_loss(logps: torch.Tensor, old_logps: Optional[torch.Tensor],
                        ref_logps: Optional[torch.Tensor], advantages: torch.Tensor,
                        mask: torch.Tensor, *, beta: float, epsilon_low: float, epsilon_high: float,
                        importance_sampling_level: str = "token", delta: Optional[float] = None,
                        vllm_is_ratio: Optional[torch.Tensor] = None):
    """Per-token GRPO loss (B, T), per-token k3 KL (B, T) or None, and the clipped-token mask."""
    if old_logps is None:
        old_logps = logps.detach()
    log_ratio = logps - old_logps
    maskf = mask.to(logps.dtype)
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    loss1 = coef_1 * adv
    loss2 = coef_2 * adv
    per_token = -torch.min(loss1, loss2)
    # TRL's clip statistics: the ratio left the trust region on the side the advantage pushes to.
    clipped = (((coef_1 < 1 - epsilon_low) & (adv < 0)) | ((coef_1 > 1 + epsilon_high) & (adv > 0)))
    clipped = clipped.expand_as(logps)
    if vllm_is_ratio is not None:
        per_token = per_token * vllm_is_ratio
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs reference log-probs")
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    return per_token, kl, clipped


def reduce_grpo_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
                     max_completion_length: Optional[int] = None,
                     num_items_in_batch: Optional[float] = None) -> torch.Tensor:
    """Reduce (B, T) per-token losses to a scalar as TRL's loss types do."""
    maskf = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * maskf).sum() / maskf.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        L = max_completion_length if max_completion_length is not None else per_token.shape[1]
        return (per_token * maskf).sum() / (per_token.shape[0] * L)
    if loss_type == "dapo":
        n = num_items_in_batch if num_items_in_batch is not None else maskf.sum().clamp(min=1.0)
        return (per_token * maskf).sum() / n
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def loss_metrics(out: LossOutput) -> dict:
    """The kernels' ``(loss, metrics)`` contract: per-token fp32 log-probs, mean KL, clip ratio."""
    return {"per_token_logps": out.per_token_logps, "kl": out.kl, "clip_ratio": out.clip_ratio}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    return (x.float() * m).sum() / m.sum().clamp(min=1.0)


def grpo_loss_reference(hidden, weight, token_ids, mask, advantages, old_logps=None, ref_logps=None, *,
                        beta, epsilon_low, epsilon_high, temperature=1.0, loss_type="grpo",
                        importance_sampling_level="token", delta=None, max_completion_length=None,
                        num_items_in_batch=None, vllm_is_ratio=None) -> LossOutput:
    """Plain-torch GRPO loss on hidden states (token-chunked log-probs, autograd backward)."""
    from fastebm.kernels.fused_linear_logprobs import eager_token_logprobs  # lazily: kernels import this module

    logps = eager_token_logprobs(hidden, weight, token_ids, temperature)
    return grpo_loss_from_logps(
        logps, old_logps, ref_logps, advantages, mask, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
        delta=delta, max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        vllm_is_ratio=vllm_is_ratio)


def grpo_loss_from_logps(logps, old_logps, ref_logps, advantages, mask, *, beta, epsilon_low, epsilon_high,
                         loss_type="grpo", importance_sampling_level="token", delta=None,
                         max_completion_length=None, num_items_in_batch=None, vllm_is_ratio=None) -> LossOutput:
    """The GRPO loss of differentiable per-token log-probs (B, T): the one place its math lives.

    The reference path above and every kernel in ``fastebm.kernels`` (which produce ``logps``
    without full logits) finish through here, so their semantics cannot drift apart.
    """
    if vllm_is_ratio is not None and vllm_is_ratio.dim() == 1:
        vllm_is_ratio = vllm_is_ratio.unsqueeze(-1)  # (B,) -> (B, 1), as TRL and Liger accept
    per_token, kl, clipped = per_token_grpo_loss(
        logps, old_logps, ref_logps, advantages, mask, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, importance_sampling_level=importance_sampling_level, delta=delta,
        vllm_is_ratio=vllm_is_ratio)
    loss = reduce_grpo_loss(per_token, mask, loss_type, max_completion_length, num_items_in_batch)
    kl_mean = _masked_mean(kl.detach(), mask) if kl is not None else logps.new_zeros((), dtype=torch.float32)
    return LossOutput(loss, logps.detach(), kl_mean, _masked_mean(clipped, mask))


def compute_grpo_loss(hidden, weight, token_ids, mask, advantages, old_logps=None, ref_logps=None, *,
                      kernel: str = "fused", **kw) -> LossOutput:
    """The trainer's single entry point: picks the plain-torch eager path or the fused kernels."""
    if kernel == "eager":
        return grpo_loss_reference(hidden, weight, token_ids, mask, advantages, old_logps, ref_logps, **kw)
    if kernel == "fused":
        from fastebm.kernels import fused_linear_grpo_loss  # imported lazily: Triton is heavy

        loss, metrics = fused_linear_grpo_loss(hidden, weight, token_ids, mask, advantages,
                                               old_logps, ref_logps, **kw)
        return LossOutput(loss, metrics["per_token_logps"].detach(), metrics["kl"], metrics["clip_ratio"])
    raise ValueError(f"grpo.kernel must be 'fused' or 'eager', got {kernel!r}")
