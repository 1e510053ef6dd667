"""The trainer's GRPO loss front-end; the loss itself lives in ``fastebm.kernels``.

    options = loss_options(cfg.grpo, temperature, cfg.rollout.max_new_tokens)    # once per update
    out = compute_grpo_loss(hidden, weight, ids, mask, advantages, old, ref, options,
                            kernel=cfg.grpo.kernel, backward=backward_options(cfg.grpo),
                            num_items_in_batch=total_tokens)

``compute_grpo_loss`` takes the policy's *hidden states* of completion tokens and the lm_head
weight, never logits. ``kernel="fused"`` runs ``fastebm.kernels.fused_linear_grpo_loss`` (Triton on
CUDA, a memory-bounded path elsewhere); ``kernel="eager"`` runs the kernels' plain-torch reference
``grpo_loss_reference``, chunked over tokens so that full (tokens x vocabulary) logits are never
held at once either. Both finish through ``fastebm.kernels.grpo_loss_from_logps``: TRL's loss
types, reductions, clipping and k3 KL, defined once (see kernels/grpo_semantics.py). The fused
path's backward strategy (``grpo.backward``, ``grpo.backward_chunk_mb``, ``grpo.deterministic``)
travels as one ``fastebm.kernels.BackwardOptions``.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastebm.config import GRPOConfig
from fastebm.kernels import BackwardOptions, GRPOLossOptions, LossOutput, fused_linear_grpo_loss, grpo_loss_reference

KERNELS = ("fused", "eager")


def loss_options(grpo_cfg: GRPOConfig, temperature: float, max_completion_length: int) -> GRPOLossOptions:
    """The loss settings of the ``[grpo]`` section, with the log-prob ``temperature`` (the rollout's,
    1 when greedy) and dr_grpo's normaliser ``max_completion_length`` (``rollout.max_new_tokens``)."""
    return GRPOLossOptions(
        beta=grpo_cfg.beta, epsilon_low=grpo_cfg.epsilon_low, epsilon_high=grpo_cfg.epsilon_high,
        temperature=temperature, loss_type=grpo_cfg.loss_type,
        importance_sampling_level=grpo_cfg.importance_sampling_level, delta=grpo_cfg.delta,
        max_completion_length=max_completion_length)


def backward_options(grpo_cfg: GRPOConfig) -> BackwardOptions:
    """The fused backward's strategy of the ``[grpo]`` section (checked: deterministic refuses atomics)."""
    return BackwardOptions(strategy=grpo_cfg.backward, chunk_mb=float(grpo_cfg.backward_chunk_mb),
                           deterministic=grpo_cfg.deterministic)


def compute_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor,
                      advantages: torch.Tensor, old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
                      options: GRPOLossOptions, *, kernel: str = "fused", backward: Optional[BackwardOptions] = None,
                      num_items_in_batch=None) -> LossOutput:
    """The trainer's single entry point: the fused kernels or the plain-torch eager path.

    hidden (B, T, H), weight (V, H), token_ids / mask / old_logps / ref_logps (B, T), advantages (B,);
    ``backward``: the fused path's backward strategy (``backward_options(cfg.grpo)``; default "gemm");
    ``num_items_in_batch``: dapo's global count of completion tokens.
    """
    if not isinstance(options, GRPOLossOptions):
        raise TypeError(f"options must be a GRPOLossOptions (see loss_options), got {type(options).__name__}")
    if kernel == "eager":
        return grpo_loss_reference(hidden, weight, token_ids, mask, advantages, old_logps, ref_logps, options,
                                   num_items_in_batch=num_items_in_batch)
    if kernel == "fused":
        loss, metrics = fused_linear_grpo_loss(hidden, weight, token_ids, mask, advantages, old_logps, ref_logps,
                                               options, num_items_in_batch=num_items_in_batch, backward=backward)
        return LossOutput(loss, metrics["per_token_logps"].detach(), metrics["kl"], metrics["clip_ratio"])
    raise ValueError(f"grpo.kernel must be one of {KERNELS}, got {kernel!r}")
