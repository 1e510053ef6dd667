"""The GRPO loss semantics, and their plain-torch reference on hidden states.

    options = GRPOLossOptions(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")
    out = grpo_loss_from_logps(logps (B, T), old (B, T) | None, ref (B, T) | None,
                               advantages (B,), mask (B, T), options)       # -> LossOutput
    out = grpo_loss_reference(hidden (B, T, H), weight (V, H), ids (B, T), mask, advantages,
                              old, ref, options)                            # plain torch

Every GRPO loss in this package finishes through ``grpo_loss_from_logps``: the fused linear loss
and the logits loss feed it the fp32 log-probs their vocabulary kernels produce, the references
feed it log-probs of plain-torch logits, so their semantics cannot drift apart. It follows TRL's
``GRPOTrainer._compute_loss`` exactly:

    log_ratio = logp - old_logp                      (old_logp = logp.detach() when absent)
    token IS:     w = exp(log_ratio)
    sequence IS:  w = exp(masked mean of log_ratio over the sequence), broadcast to tokens
    loss_t = -min(clamp(w, max=delta) * A, clamp(w, 1 - eps_low, 1 + eps_high) * A)
    loss_t *= vllm_is_ratio                           (when given)
    loss_t += beta * (exp(d) - d - 1), d = ref - logp         (k3 KL, when beta != 0;
                                                              d clamped to +-kl_clamp when set)

    grpo:    mean over sequences of (masked token mean per sequence)
    bnpo:    masked token sum / number of unmasked tokens
    dr_grpo: masked token sum / (batch size * max_completion_length)
    dapo:    masked token sum / num_items_in_batch  (global count of completion tokens)

No Triton here: this is O(B * T) elementwise work on log-probs (the ``*_ref`` of every GRPO loss
and the epilogue of every GRPO kernel). Adding a loss type or an option is local to this file: a
field of ``GRPOLossOptions`` with its check, a branch of the per-token loss, an entry of
``REDUCTIONS`` (the kernels take ``options`` whole and need no new keyword).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

from .fused_linear_logprobs import eager_token_logprobs

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
IS_LEVELS: tuple[str, ...] = get_args(ImportanceSamplingLevel)

# --------------------------------------------------------------------------------------------- #
# Options
# --------------------------------------------------------------------------------------------- #


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True, kw_only=True)
class GRPOLossOptions:
    """The settings of a GRPO loss, fixed for a run; checked on construction (and on ``replace``).

    Per-call tensors (old / reference log-probs, advantages, mask, ``num_items_in_batch``,
    ``vllm_is_ratio``) are arguments of the loss functions, not options. The defaults are those of
    fastebm's ``[grpo]`` config section (and Liger's, except its ``loss_type="dapo"``).
    """

    beta: float = 0.04
    """Weight of the k3 KL to the reference log-probs (0: no KL, no reference needed)."""
    epsilon_low: float = 0.2
    """Lower clip of the importance ratio: 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper clip of the importance ratio: 1 + epsilon_high."""
    temperature: float = 1.0
    """Logits are divided by it before the softmax (hidden-state and logits paths; log-probs given
    to ``grpo_loss_from_logps`` are already tempered)."""
    loss_type: LossType = "grpo"
    """Reduction over tokens and sequences, as TRL: grpo, bnpo, dr_grpo, dapo."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """Importance ratio per token (GRPO) or per sequence (GSPO)."""
    delta: Optional[float] = None
    """Two-sided clipping: the unclipped ratio is also capped at delta (None: off)."""
    max_completion_length: Optional[int] = None
    """dr_grpo's constant normaliser (tokens per sequence); required by dr_grpo, unused otherwise."""
    kl_clamp: Optional[float] = None
    """Clamp the k3 KL's log-ratio ``ref - logp`` to [-kl_clamp, kl_clamp] (None: off, as TRL; EBM-RL's
    released run: 10). ``torch.clamp``: no KL gradient where the log-ratio is outside the range."""

    def __post_init__(self):
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"GRPOLossOptions.{name} must be {what}, got {getattr(self, name)!r}")

        need(_is_number(self.beta) and self.beta >= 0, "beta", "a finite number >= 0")
        need(_is_number(self.epsilon_low) and self.epsilon_low >= 0, "epsilon_low", "a finite number >= 0")
        need(_is_number(self.epsilon_high) and self.epsilon_high >= 0, "epsilon_high", "a finite number >= 0")
        need(_is_number(self.temperature) and self.temperature > 0, "temperature", "a finite number > 0")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"one of {LOSS_TYPES}")
        need(self.importance_sampling_level in IS_LEVELS, "importance_sampling_level", f"one of {IS_LEVELS}")
        need(self.delta is None or (_is_number(self.delta) and self.delta > 0), "delta",
             "None or a finite number > 0")
        mcl = self.max_completion_length
        need(mcl is None or (isinstance(mcl, int) and not isinstance(mcl, bool) and mcl >= 1),
             "max_completion_length", "None or an int >= 1")
        need(self.loss_type != "dr_grpo" or mcl is not None, "max_completion_length",
             "set (an int >= 1) when loss_type='dr_grpo'")
        need(self.kl_clamp is None or (_is_number(self.kl_clamp) and self.kl_clamp > 0), "kl_clamp",
             "None or a finite number > 0")


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(GRPOLossOptions))


def resolve_options(options: Optional[GRPOLossOptions], overrides: dict, caller: str) -> GRPOLossOptions:
    """``options`` (default ``GRPOLossOptions()``) with the keyword ``overrides`` applied over it.

    The public loss functions accept the settings as keywords too (``beta=...``, backward
    compatible); they are turned into one options object here, once per call.
    """
    if options is not None and not isinstance(options, GRPOLossOptions):
        raise TypeError(f"{caller}: options must be a GRPOLossOptions, got {type(options).__name__}")
    unknown = sorted(set(overrides) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}; "
                        f"the loss settings are GRPOLossOptions fields: {sorted(OPTION_NAMES)}")
    if options is None:
        return GRPOLossOptions(**overrides)
    return dataclasses.replace(options, **overrides) if overrides else options


# --------------------------------------------------------------------------------------------- #
# Per-token loss and reductions
# --------------------------------------------------------------------------------------------- #


@dataclass
class LossOutput:
    loss: torch.Tensor                 # scalar, differentiable
    per_token_logps: torch.Tensor      # (B, T) fp32, detached
    kl: torch.Tensor                   # scalar: masked mean k3 KL (0 when beta == 0 and no ref)
    clip_ratio: torch.Tensor           # scalar: fraction of unmasked tokens whose ratio was clipped


def _token_log_weights(log_ratio, maskf):
    return log_ratio                                                        # (B, T)


def _sequence_log_weights(log_ratio, maskf):
    return ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)


# importance_sampling_level -> log importance weights from (log_ratio (B, T), float mask (B, T))
LOG_WEIGHTS = {"token": _token_log_weights, "sequence": _sequence_log_weights}


def per_token_grpo_loss(logps: torch.Tensor, old_logps: Optional[torch.Tensor],
                        ref_logps: Optional[torch.Tensor], advantages: torch.Tensor, mask: torch.Tensor,
                        options: GRPOLossOptions, vllm_is_ratio: Optional[torch.Tensor] = None):
    """Per-token GRPO loss (B, T), per-token k3 KL (B, T) or None, and the clipped-token mask (B, T)."""
    o = options
    if old_logps is None:
        old_logps = logps.detach()
    log_ratio = logps - old_logps
    maskf = mask.to(logps.dtype)
    coef_1 = torch.exp(LOG_WEIGHTS[o.importance_sampling_level](log_ratio, maskf))
    # The clipped surrogate every current loss type shares (a loss type with its own surrogate,
    # e.g. CISPO's, would branch on o.loss_type here).
    coef_2 = torch.clamp(coef_1, 1 - o.epsilon_low, 1 + o.epsilon_high)
    if o.delta is not None:
        coef_1 = torch.clamp(coef_1, max=o.delta)
    adv = advantages.to(logps.dtype).unsqueeze(1)                            # (B, 1)
    loss1 = coef_1 * adv
    loss2 = coef_2 * adv
    per_token = -torch.min(loss1, loss2)
    # TRL's clip statistics: the ratio left the trust region on the side the advantage pushes to.
    clipped = (((coef_1 < 1 - o.epsilon_low) & (adv < 0)) | ((coef_1 > 1 + o.epsilon_high) & (adv > 0)))
    clipped = clipped.expand_as(logps)
    if vllm_is_ratio is not None:
        per_token = per_token * vllm_is_ratio
    kl = None
    if o.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs reference log-probs")
        d = ref_logps - logps
        if o.kl_clamp is not None:
            d = torch.clamp(d, min=-o.kl_clamp, max=o.kl_clamp)
        kl = torch.exp(d) - d - 1
        per_token = per_token + o.beta * kl
    return per_token, kl, clipped


def _reduce_grpo(per_token, maskf, options, num_items_in_batch):
    return ((per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).mean()


def _reduce_bnpo(per_token, maskf, options, num_items_in_batch):
    return (per_token * maskf).sum() / maskf.sum().clamp(min=1.0)


def _reduce_dr_grpo(per_token, maskf, options, num_items_in_batch):
    return (per_token * maskf).sum() / (per_token.shape[0] * options.max_completion_length)


def _reduce_dapo(per_token, maskf, options, num_items_in_batch):
    n = num_items_in_batch if num_items_in_batch is not None else maskf.sum().clamp(min=1.0)
    return (per_token * maskf).sum() / n


# loss_type -> reduction of the (B, T) per-token losses to the scalar loss
REDUCTIONS = {"grpo": _reduce_grpo, "bnpo": _reduce_bnpo, "dr_grpo": _reduce_dr_grpo, "dapo": _reduce_dapo}
assert set(REDUCTIONS) == set(LOSS_TYPES) and set(LOG_WEIGHTS) == set(IS_LEVELS)


def reduce_grpo_loss(per_token: torch.Tensor, mask: torch.Tensor, options: GRPOLossOptions,
                     num_items_in_batch=None) -> torch.Tensor:
    """Reduce (B, T) per-token losses to a scalar as TRL's loss types do."""
    return REDUCTIONS[options.loss_type](per_token, mask.to(per_token.dtype), options, num_items_in_batch)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    return (x.float() * m).sum() / m.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------- #
# Public functions
# --------------------------------------------------------------------------------------------- #


def grpo_loss_from_logps(logps: torch.Tensor, old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
                         advantages: torch.Tensor, mask: torch.Tensor, options: GRPOLossOptions, *,
                         num_items_in_batch=None, vllm_is_ratio: Optional[torch.Tensor] = None) -> LossOutput:
    """The GRPO loss of differentiable per-token log-probs (B, T): the one place its math lives.

    ``options.temperature`` is not used: ``logps`` are already those of the tempered logits.
    """
    if vllm_is_ratio is not None and vllm_is_ratio.dim() == 1:
        vllm_is_ratio = vllm_is_ratio.unsqueeze(-1)  # (B,) -> (B, 1), as TRL and Liger accept
    per_token, kl, clipped = per_token_grpo_loss(logps, old_logps, ref_logps, advantages, mask, options,
                                                 vllm_is_ratio)
    loss = reduce_grpo_loss(per_token, mask, options, num_items_in_batch)
    kl_mean = _masked_mean(kl.detach(), mask) if kl is not None else logps.new_zeros((), dtype=torch.float32)
    return LossOutput(loss, logps.detach(), kl_mean, _masked_mean(clipped, mask))


def loss_metrics(out: LossOutput) -> dict:
    """The kernels' ``(loss, metrics)`` contract: per-token fp32 log-probs, mean KL, clip ratio."""
    return {"per_token_logps": out.per_token_logps, "kl": out.kl, "clip_ratio": out.clip_ratio}


# --------------------------------------------------------------------------------------------- #
# Plain-torch reference on hidden states
# --------------------------------------------------------------------------------------------- #


def grpo_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor,
                        advantages: torch.Tensor, old_logps: Optional[torch.Tensor] = None,
                        ref_logps: Optional[torch.Tensor] = None, options: Optional[GRPOLossOptions] = None, *,
                        num_items_in_batch=None, vllm_is_ratio: Optional[torch.Tensor] = None) -> LossOutput:
    """Plain-torch GRPO loss on hidden states (B, T, H): log-probs of token-chunked logits (at most
    1024 x V at a time, ``eager_token_logprobs``), autograd backward. float64 inputs stay float64."""
    options = options if options is not None else GRPOLossOptions()
    logps = eager_token_logprobs(hidden, weight, token_ids, options.temperature)
    return grpo_loss_from_logps(logps, old_logps, ref_logps, advantages, mask, options,
                                num_items_in_batch=num_items_in_batch, vllm_is_ratio=vllm_is_ratio)
