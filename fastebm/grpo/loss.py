"""The trainer's GRPO loss front-end; the loss itself lives in ``fastebm.kernels``.

    options = loss_options(cfg.grpo, temperature, cfg.rollout.max_new_tokens)    # once per update
    out = compute_grpo_loss(hidden, weight, ids, mask, advantages, old, ref, options,
                            kernel=cfg.grpo.kernel, backward=backward_options(cfg.grpo),
                            num_items_in_batch=total_tokens)

``compute_grpo_loss`` takes the policy's *hidden states* of completion tokens and the lm_head
weight, never logits. ``kernel="fused"`` runs ``fastebm.kernels.fused_linear_grpo_loss`` (Triton on
CUDA, a memory-bounded path elsewhere); ``kernel="eager"`` runs the kernels' plain-torch reference
``grpo_loss_reference``, chunked over tokens so that full (tokens x vocabulary) logits are never
held at once either. Both finish through ``fastebm.kernels.grpo_loss_from_logps``: TRL 1.16's loss
types and options (clipping, delta, k3 KL and its bias correction, cispo / sapo / luspo / vespo,
the entropy quantile, the off-policy mask), defined once (see kernels/grpo_semantics.py). The fused
path's backward strategy (``grpo.backward``, ``grpo.backward_chunk_mb``, ``grpo.deterministic``)
travels as one ``fastebm.kernels.BackwardOptions``.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastebm.config import GRPOConfig
from fastebm.kernels import BackwardOptions, GRPOLossOptions, LossOutput, fused_linear_grpo_loss, grpo_loss_reference
from fastebm.kernels.grpo_semantics import GLOBAL_TOKEN_NORMALISED, LOSS_TYPES

KERNELS = ("fused", "eager")


def loss_options(grpo_cfg: GRPOConfig, temperature: float, max_completion_length: int) -> GRPOLossOptions:
    """The loss settings of the ``[grpo]`` section, with the log-prob ``temperature`` (the rollout's,
    1 when greedy) and dr_grpo's normaliser ``max_completion_length`` (``rollout.max_new_tokens``).
    (``mask_truncated_completions`` is applied by the trainer to the mask, not by the loss.)"""
    g = grpo_cfg
    return GRPOLossOptions(
        beta=g.beta, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, temperature=temperature,
        loss_type=g.loss_type, importance_sampling_level=g.importance_sampling_level, delta=g.delta,
        max_completion_length=max_completion_length, use_bias_correction_kl=g.use_bias_correction_kl,
        sapo_temperature_pos=g.sapo_temperature_pos, sapo_temperature_neg=g.sapo_temperature_neg,
        vespo_k_pos=g.vespo_k_pos, vespo_lambda_pos=g.vespo_lambda_pos, vespo_k_neg=g.vespo_k_neg,
        vespo_lambda_neg=g.vespo_lambda_neg, top_entropy_quantile=g.top_entropy_quantile,
        off_policy_mask_threshold=g.off_policy_mask_threshold, kl_clamp=g.kl_clamp)


def micro_batch_scale(loss_type: str, *, sequences: int, total_sequences: int, tokens: int,
                      total_tokens: int) -> float:
    """The factor on a micro-batch's loss that makes the accumulated gradient that of the whole batch:
    the micro-batch's share of the sequences for the per-sequence means (grpo, sapo, luspo) and
    dr_grpo's constant, its share of the tokens for bnpo; 1 for dapo, cispo and vespo, which already
    divide by the global token count (``num_items_in_batch``)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type in GLOBAL_TOKEN_NORMALISED:
        return 1.0
    if loss_type == "bnpo":
        return tokens / max(1, total_tokens)
    return sequences / max(1, total_sequences)


def backward_options(grpo_cfg: GRPOConfig) -> BackwardOptions:
    """The fused backward's strategy of the ``[grpo]`` section (checked: deterministic refuses atomics)."""
    return BackwardOptions(strategy=grpo_cfg.backward, chunk_mb=float(grpo_cfg.backward_chunk_mb),
                           deterministic=grpo_cfg.deterministic)


def compute_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor,
                      advantages: torch.Tensor, old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
                      options: GRPOLossOptions, *, kernel: str = "fused", backward: Optional[BackwardOptions] = None,
                      num_items_in_batch=None, sampling_logps: Optional[torch.Tensor] = None) -> LossOutput:
    """The trainer's single entry point: the fused kernels or the plain-torch eager path.

    hidden (B, T, H), weight (V, H), token_ids / mask / old_logps / ref_logps (B, T), advantages (B,);
    ``backward``: the fused path's backward strategy (``backward_options(cfg.grpo)``; default "gemm");
    ``num_items_in_batch``: the global count of completion tokens (dapo, cispo, vespo);
    ``sampling_logps`` (B, T): the rollout's own log-probs, for ``off_policy_mask_threshold``.
    """
    if not isinstance(options, GRPOLossOptions):
        raise TypeError(f"options must be a GRPOLossOptions (see loss_options), got {type(options).__name__}")
    if kernel == "eager":
        return grpo_loss_reference(hidden, weight, token_ids, mask, advantages, old_logps, ref_logps, options,
                                   num_items_in_batch=num_items_in_batch, sampling_logps=sampling_logps)
    if kernel == "fused":
        loss, metrics = fused_linear_grpo_loss(hidden, weight, token_ids, mask, advantages, old_logps, ref_logps,
                                               options, num_items_in_batch=num_items_in_batch,
                                               sampling_per_token_logps=sampling_logps, backward=backward)
        return LossOutput(loss, metrics["per_token_logps"].detach(), metrics["kl"], metrics["clip_ratio"],
                          metrics.get("entropy"))
    raise ValueError(f"grpo.kernel must be one of {KERNELS}, got {kernel!r}")
