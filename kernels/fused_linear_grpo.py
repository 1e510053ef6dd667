"""The GRPO loss on hidden states and the lm_head weight, without full logits.

    loss, metrics = fused_linear_grpo_loss(hidden (B, T, H), weight (V, H), ids (B, T), mask (B, T),
                                           advantages (B,), old_logps (B, T) | None, ref_logps (B, T) | None,
                                           GRPOLossOptions(beta=..., loss_type=...))

The vocabulary-sized work (the logit tiles, their online log-sum-exp and the selected logit in the
forward; the recomputed tiles, d hidden and d weight in the backward) runs in the kernels of
``fused_linear_logprobs.py`` (Triton on CUDA, a token x vocabulary chunked PyTorch path elsewhere).
What is left is O(B * T): ratio, clip, k3 KL, per-token loss and the loss-type reduction on the
fp32 per-token log-probs, done by ``grpo_semantics.grpo_loss_from_logps`` — the single home of
the TRL-exact semantics. Autograd turns that into one per-token upstream scalar dL/dlogp, which the
backward kernel folds into its recomputed tiles. (Sequence-level importance sampling, VESPO's
weights and the off-policy mask need per-sequence reductions of the log-ratios, and
``top_entropy_quantile`` a batch quantile of the entropies, before any token's loss is known, which
is why this epilogue is not inside the vocabulary kernel. The entropies themselves come out of the
same forward pass as the log-probs.)

``FusedLinearGRPOLoss`` is a drop-in for Liger 0.8.5's ``LigerFusedLinearGRPOLoss`` (same
constructor and forward signatures, same ``(loss, (kl?, clip_ratio))`` return) for other GRPO
code; ``fastebm.integrations.trl.FusedGRPOTrainer`` is the one for TRL 1.16's ``GRPOTrainer``.

``backward=`` (both; beyond Liger's signature) picks how the backward computes d hidden and d
weight: ``"gemm"`` (default, deterministic), ``"atomic"`` or ``"sparse"``, or a
``BackwardOptions(strategy, chunk_mb, deterministic)`` (see fused_linear_logprobs.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from ._backend import resolve_backend
from .fused_linear_logprobs import BackwardOptions, linear_logprobs, resolve_backward, token_logprobs
from .grpo_semantics import (GLOBAL_TOKEN_NORMALISED, LOSS_TYPES, GRPOLossOptions, grpo_loss_from_logps,
                             grpo_loss_reference, loss_metrics, resolve_options)

# Loss types Liger 0.8.5 runs at token level only (TRL 1.16 allows sequence level for them).
LIGER_TOKEN_ONLY = ("cispo", "sapo", "vespo")


def _validate(hidden, weight, token_ids, mask, advantages, backend="auto"):
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be (B, T, H), got {tuple(hidden.shape)}")
    if token_ids.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
        raise ValueError(f"token ids {tuple(token_ids.shape)} and mask {tuple(mask.shape)} must be "
                         f"{tuple(hidden.shape[:2])}")
    if advantages.shape not in (hidden.shape[:1], hidden.shape[:2]):
        raise ValueError(f"advantages must be (B,) = {tuple(hidden.shape[:1])} or (B, T) = {tuple(hidden.shape[:2])}, "
                         f"got {tuple(advantages.shape)}")
    # float64 runs on the chunked PyTorch path only (the float64 parity tests); Triton takes 16/32-bit.
    lowp = (torch.float16, torch.bfloat16, torch.float32)
    if hidden.dtype not in lowp and not (hidden.dtype == torch.float64
                                         and resolve_backend(backend, hidden.device) == "torch"):
        raise TypeError(f"hidden must be bf16, fp16 or fp32 (float64 with backend='torch'), got {hidden.dtype}")


def fused_linear_grpo_loss(hidden, weight, selected_token_ids, attention_mask, advantages,
                           old_per_token_logps=None, ref_per_token_logps=None,
                           options: Optional[GRPOLossOptions] = None, *, num_items_in_batch=None,
                           vllm_is_ratio=None, sampling_per_token_logps=None, bias=None, backend: str = "auto",
                           return_entropy: bool = False, backward: Union[str, BackwardOptions, None] = None,
                           **option_overrides):
    """``(loss, metrics)``; metrics: "per_token_logps" (B, T) fp32, "kl" and "clip_ratio" (scalars),
    "entropy" (B, T) when computed (``return_entropy`` or ``top_entropy_quantile < 1``), and with
    ``backward="sparse"`` "sparse_tiles", (2,) int32 [vocabulary tiles skipped, tiles computed],
    filled in by ``loss.backward()``.

    Differentiable in ``hidden``, ``weight`` (and ``bias``). The loss settings are ``options``; any
    ``GRPOLossOptions`` field may also be given as a keyword (``beta=0.04, loss_type="dapo"``),
    applied over ``options``. Loss types, options and reductions exactly as ``grpo_semantics`` (TRL's
    GRPOTrainer) defines them. The per-token entropy comes from the same vocabulary pass as the
    log-probs (no second pass, no logits); ``sampling_per_token_logps`` (B, T) feeds
    ``off_policy_mask_threshold`` (default: the old log-probs). ``backward``: the backward strategy
    (a name or ``BackwardOptions``; default "gemm").
    """
    options = resolve_options(options, option_overrides, "fused_linear_grpo_loss")
    backward = resolve_backward(backward)
    _validate(hidden, weight, selected_token_ids, attention_mask, advantages, backend)
    stats = (torch.zeros(2, dtype=torch.int32, device=hidden.device) if backward.strategy == "sparse" else None)
    want_entropy = return_entropy or options.top_entropy_quantile < 1.0
    res = linear_logprobs(hidden, weight, selected_token_ids, options.temperature, bias=bias, backend=backend,
                          return_entropy=want_entropy, backward=backward, stats=stats)
    logps, entropies = res if want_entropy else (res, None)
    out = grpo_loss_from_logps(logps, old_per_token_logps, ref_per_token_logps, advantages, attention_mask,
                               options, num_items_in_batch=num_items_in_batch, vllm_is_ratio=vllm_is_ratio,
                               entropies=entropies, sampling_logps=sampling_per_token_logps)
    metrics = loss_metrics(out)
    if stats is not None:
        metrics["sparse_tiles"] = stats
    return out.loss, metrics


def fused_linear_grpo_loss_ref(hidden, weight, selected_token_ids, attention_mask, advantages,
                               old_per_token_logps=None, ref_per_token_logps=None,
                               options: Optional[GRPOLossOptions] = None, *, num_items_in_batch=None,
                               vllm_is_ratio=None, sampling_per_token_logps=None, bias=None, backend: str = "auto",
                               return_entropy: bool = False, backward=None, upcast: bool = False, **option_overrides):
    """Plain torch (``grpo_semantics.grpo_loss_reference``); ``upcast=True`` runs in float64."""
    del backend, backward
    options = resolve_options(options, option_overrides, "fused_linear_grpo_loss_ref")
    if bias is not None:
        raise NotImplementedError("the reference has no bias; add it to the weight's logits yourself")
    if upcast:
        hidden, weight = hidden.double(), weight.double()
    out = grpo_loss_reference(hidden, weight, selected_token_ids, attention_mask, advantages, old_per_token_logps,
                              ref_per_token_logps, options, num_items_in_batch=num_items_in_batch,
                              vllm_is_ratio=vllm_is_ratio, sampling_logps=sampling_per_token_logps,
                              return_entropy=return_entropy)
    return out.loss, loss_metrics(out)


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class FusedLinearGRPOLoss(torch.nn.Module):
    """Drop-in for Liger 0.8.5's ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``.

    The same constructor (same keywords, same positional order, same defaults: ``loss_type="dapo"``,
    ``use_bias_correction_kl=False``) and the same ``forward`` keywords; returns ``(loss, metrics)``
    with metrics ``(mean k3 KL, clip ratio)`` when ``beta != 0`` and ``(clip ratio,)`` otherwise, as
    Liger does. Every loss type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo), token and
    sequence importance sampling, ``delta``, ``use_bias_correction_kl``, ``vllm_is_ratio``, the SAPO
    and VESPO knobs and ``num_items_in_batch``. Combinations Liger refuses are refused here too, with
    a ``ValueError`` naming the keyword, but at construction rather than on the first forward
    (sequence-level importance sampling with cispo / sapo / vespo; a non-positive SAPO temperature or
    ``delta``; dr_grpo without ``max_completion_length``). ``compiled`` and ``chunk_size`` are
    accepted and ignored (nothing here is compiled or chunked by the caller). ``backend`` (keyword
    only) is fastebm's. Like Liger and TRL, dapo / cispo / vespo divide ``num_items_in_batch`` (or,
    without it, the all-reduced token count) by the world size.

    One deliberate difference: luspo follows TRL 1.16 (mean over sequences of the masked per-token
    loss sum), where Liger 0.8.5 multiplies the unmasked per-token loss by the sequence lengths and
    divides by B * T; the two agree only when the per-token loss is one value per sequence
    (sequence-level importance sampling, beta = 0, no vllm_is_ratio per token).

    Beyond Liger's signature (keyword only): ``backend``, ``backward`` ("gemm" | "atomic" |
    "sparse"), ``backward_chunk_mb`` and ``deterministic`` (refuses the strategies with float
    atomics), see ``BackwardOptions``.
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True,
                 chunk_size: int = 1, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", max_completion_length: Optional[int] = None,
                 importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, temperature: float = 1.0, delta: Optional[float] = None,
                 use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                 vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, *, backend: str = "auto",
                 backward: str = "gemm", backward_chunk_mb: Optional[float] = None, deterministic: bool = False):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"FusedLinearGRPOLoss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if importance_sampling_level == "sequence" and loss_type in LIGER_TOKEN_ONLY:
            raise ValueError(f"FusedLinearGRPOLoss: importance_sampling_level='sequence' is not supported for "
                             f"loss_type={loss_type!r} (as in Liger); use importance_sampling_level='token'")
        # The settings, checked once here (a bad value is a ValueError naming its keyword, e.g.
        # "GRPOLossOptions.delta must be ..."). Without reference log-probs forward runs with beta = 0.
        self.options = GRPOLossOptions(
            beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, temperature=temperature,
            loss_type=loss_type, importance_sampling_level=importance_sampling_level, delta=delta,
            max_completion_length=max_completion_length, use_bias_correction_kl=use_bias_correction_kl,
            sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
            vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg)
        self._options_without_kl = dataclasses.replace(self.options, beta=0.0)
        self.compiled, self.chunk_size = compiled, chunk_size  # Liger's attributes; unused here
        self.use_ref_model, self.backend = use_ref_model, backend
        self.backward = BackwardOptions(strategy=backward, deterministic=deterministic,
                                        **({} if backward_chunk_mb is None else {"chunk_mb": backward_chunk_mb}))

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None):
        options = self.options
        if options.beta != 0.0 and ref_per_token_logps is None:
            if self.use_ref_model and ref_input is not None:
                ref_per_token_logps = token_logprobs(
                    ref_input, ref_weight if ref_weight is not None else lin_weight, selected_token_ids,
                    options.temperature, bias=ref_bias, backend=self.backend)
            else:
                # Liger's loss falls back to ref = logp.detach(): KL and its gradient are then exactly 0.
                options = self._options_without_kl
        if options.loss_type in GLOBAL_TOKEN_NORMALISED:
            world = _world_size()
            if num_items_in_batch is None:
                n = attention_mask.to(torch.float32).sum()
                if world > 1:
                    n = n.clone()
                    torch.distributed.all_reduce(n)
            else:
                n = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=attention_mask.device)
            num_items_in_batch = torch.clamp(n / world, min=1.0)
        loss, metrics = fused_linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, old_per_token_logps,
            ref_per_token_logps, options, num_items_in_batch=num_items_in_batch, vllm_is_ratio=vllm_is_ratio,
            bias=bias, backend=self.backend, backward=self.backward)
        if self.options.beta != 0.0:
            return loss, (metrics["kl"], metrics["clip_ratio"])
        return loss, (metrics["clip_ratio"],)
