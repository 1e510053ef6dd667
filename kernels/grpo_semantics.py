"""The GRPO loss semantics, and their plain-torch reference on hidden states.

    options = GRPOLossOptions(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")
    out = grpo_loss_from_logps(logps (B, T), old (B, T) | None, ref (B, T) | None,
                               advantages (B,) | (B, T), mask (B, T), options)   # -> LossOutput
    out = grpo_loss_reference(hidden (B, T, H), weight (V, H), ids (B, T), mask, advantages,
                              old, ref, options)                            # plain torch

Every GRPO loss in this package finishes through ``grpo_loss_from_logps``: the fused linear loss
and the logits loss feed it the fp32 log-probs their vocabulary kernels produce, the references
feed it log-probs of plain-torch logits, so their semantics cannot drift apart. It follows TRL
1.16's ``GRPOTrainer._compute_loss`` (read, not copied), step by step:

    log_ratio = logp - old_logp                      (old_logp = logp.detach() when absent)
    token IS:     w = exp(log_ratio)                                            (B, T)
    sequence IS:  w = exp(masked mean of log_ratio over the sequence)           (B, 1), GSPO
    kl_t = exp(d) - d - 1, d = ref - logp             (k3, when beta != 0; d clamped to +-kl_clamp
                                                      when set)
    kl_t *= w                                        (use_bias_correction_kl, DeepSeek-V3.2)
    surrogate, by loss type (A = advantage):
      grpo, bnpo, dr_grpo, dapo, luspo:  -min(clamp(w, max=delta) * A, clamp(w, 1-eps_low, 1+eps_high) * A)
      cispo:  -sg(clamp(w, max=epsilon_high)) * A * logp                (MiniMax-M1; sg = detach)
      sapo:   -sigmoid(tau * (w - 1)) * 4 / tau * A, tau = sapo_temperature_pos if A > 0 else _neg
      vespo:  -sg(phi(W)) * A * logp, W = exp(sum_t clamp(log_ratio)) * prod vllm_is_ratio per
              sequence, phi(W) = exp(lambda + k log W - lambda W), (k, lambda) by the sign of A
    loss_t *= off-policy sequence mask               (off_policy_mask_threshold, DeepSeek-V3.2:
                                                      drop A < 0 sequences whose mean
                                                      sampling_logp - logp exceeds it)
    loss_t *= entropy mask                           (top_entropy_quantile < 1: only tokens whose
                                                      entropy is in the top quantile of the batch)
    loss_t *= vllm_is_ratio                          (when given; not for vespo, which folds it in phi)
    loss_t += beta * kl_t

    grpo, sapo:         mean over sequences of (masked token mean per sequence)
    bnpo:               masked token sum / number of unmasked tokens
    dr_grpo:            masked token sum / (batch size * max_completion_length)
    dapo, cispo, vespo: masked token sum / num_items_in_batch  (global count of completion tokens)
    luspo:              mean over sequences of (masked token sum per sequence)

No Triton here: this is O(B * T) elementwise work on log-probs (the ``*_ref`` of every GRPO loss
and the epilogue of every GRPO kernel). What it needs from the vocabulary besides the log-probs is
the per-token entropy (``top_entropy_quantile``), which the fused forward produces in the same pass;
the per-sequence mean log-ratio of sequence-level IS is a reduction of the log-probs. Adding a loss
type or an option is local to this file: a field of ``GRPOLossOptions`` with its check, an entry
of ``SURROGATES`` (loss type -> per-token surrogate) and of ``REDUCTIONS`` (loss type -> reduction)
(the kernels take ``options`` whole and need no new keyword).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

from .fused_linear_logprobs import eager_token_logprobs

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
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
    """Surrogate and reduction, as TRL 1.16: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """Importance ratio per token (GRPO) or per sequence (GSPO)."""
    delta: Optional[float] = None
    """Two-sided clipping: the unclipped ratio is also capped at delta (None: off)."""
    max_completion_length: Optional[int] = None
    """dr_grpo's constant normaliser (tokens per sequence); required by dr_grpo, unused otherwise."""
    kl_clamp: Optional[float] = None
    """Clamp the k3 KL's log-ratio ``ref - logp`` to [-kl_clamp, kl_clamp] (None: off, as TRL; EBM-RL's
    released run: 10). ``torch.clamp``: no KL gradient where the log-ratio is outside the range."""
    use_bias_correction_kl: bool = False
    """Multiply the k3 KL by the (unclipped) importance ratio (DeepSeek-V3.2). TRL 1.16 defaults to
    True, Liger and fastebm to False."""
    sapo_temperature_pos: float = 1.0
    """sapo: temperature of the soft gate for tokens with a positive advantage."""
    sapo_temperature_neg: float = 1.05
    """sapo: temperature of the soft gate for tokens with a zero or negative advantage."""
    vespo_k_pos: float = 2.0
    """vespo: power k of the gamma weight for advantages >= 0."""
    vespo_lambda_pos: float = 3.0
    """vespo: decay lambda of the gamma weight for advantages >= 0."""
    vespo_k_neg: float = 3.0
    """vespo: power k of the gamma weight for negative advantages."""
    vespo_lambda_neg: float = 2.0
    """vespo: decay lambda of the gamma weight for negative advantages."""
    top_entropy_quantile: float = 1.0
    """Keep in the policy term only tokens whose entropy is at or above the (1 - q) quantile of the
    batch's unmasked tokens (1.0: all tokens; 0.0: only the highest). Needs per-token entropies."""
    off_policy_mask_threshold: Optional[float] = None
    """Drop sequences with a negative advantage whose mean (sampling - current) log-prob exceeds it
    (off-policy sequence masking, DeepSeek-V3.2; None: off)."""

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
        need(isinstance(self.use_bias_correction_kl, bool), "use_bias_correction_kl", "a bool")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            need(_is_number(getattr(self, name)) and getattr(self, name) > 0, name, "a finite number > 0")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            need(_is_number(getattr(self, name)), name, "a finite number")
        need(_is_number(self.top_entropy_quantile) and 0.0 <= self.top_entropy_quantile <= 1.0,
             "top_entropy_quantile", "a number in [0, 1]")
        need(self.off_policy_mask_threshold is None or _is_number(self.off_policy_mask_threshold),
             "off_policy_mask_threshold", "None or a finite number")


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
    entropies: Optional[torch.Tensor] = None  # (B, T) per-token entropies, detached, when computed


def _token_log_weights(log_ratio, maskf):
    return log_ratio                                                        # (B, T)


def _sequence_log_weights(log_ratio, maskf):
    return ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)


# importance_sampling_level -> log importance weights from (log_ratio (B, T), float mask (B, T))
LOG_WEIGHTS = {"token": _token_log_weights, "sequence": _sequence_log_weights}


@dataclass
class Surrogate:
    """What a loss type's surrogate gives: the per-token policy loss (before the masks, the
    rollout-engine correction and the KL), and TRL's clip statistics (bool, broadcastable to (B, T))."""
    per_token: torch.Tensor            # (B, T) or (B, 1)
    low_clipped: torch.Tensor          # ratio below the trust region where the advantage is negative
    high_clipped: torch.Tensor         # ratio above it where the advantage is positive
    phi: Optional[torch.Tensor] = None  # vespo's gamma weight (B, 1), detached


def _clipped_surrogate(o, coef_1, log_ratio, logps, adv, maskf, vllm_is_ratio):
    # PPO's clip; with delta (INTELLECT-2) the unclipped branch is capped too. The clip statistics
    # use the delta-capped ratio, as TRL's metrics do.
    coef_2 = torch.clamp(coef_1, 1 - o.epsilon_low, 1 + o.epsilon_high)
    if o.delta is not None:
        coef_1 = torch.clamp(coef_1, max=o.delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    return Surrogate(per_token, (coef_1 < 1 - o.epsilon_low) & (adv < 0), (coef_1 > 1 + o.epsilon_high) & (adv > 0))


def _cispo_surrogate(o, coef_1, log_ratio, logps, adv, maskf, vllm_is_ratio):
    # The clipped ratio is a constant weight on the REINFORCE term: gradients flow through logp only.
    # epsilon_high is the raw cap (ScaleRL's eps_max, e.g. 5.0), not 1 + epsilon_high.
    weight = torch.clamp(coef_1, max=o.epsilon_high).detach()
    high = (coef_1 > o.epsilon_high) & (adv > 0)
    return Surrogate(-weight * adv * logps, torch.zeros_like(high), high)


def _sapo_surrogate(o, coef_1, log_ratio, logps, adv, maskf, vllm_is_ratio):
    # A sigmoid gate instead of a hard clip; its slope at ratio 1 is 1 whatever the temperature.
    tau = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg).to(coef_1.dtype)
    gate = torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau
    none = torch.zeros_like(gate, dtype=torch.bool)
    return Surrogate(-gate * adv, none, none)


def vespo_gamma_weights(advantages: torch.Tensor, log_ratio: torch.Tensor, maskf: torch.Tensor,
                        vllm_is_ratio: Optional[torch.Tensor], k_pos: float, lambda_pos: float, k_neg: float,
                        lambda_neg: float) -> torch.Tensor:
    """VESPO's detached per-sequence weight phi(W) (B, 1) = exp(lambda + k log W - lambda W), with
    log W the masked SUM of the per-token log-ratios (each clamped to [-20, 20]) plus the sum of the
    log rollout-engine ratios, clamped to [log 1e-8, 20]; (k, lambda) by the sign of the advantage
    (>= 0: pos). Computed in log space; non-finite weights become 0. ``advantages`` (B, 1), or (B, T)
    (then (k, lambda), hence phi, are per token, as in TRL)."""
    with torch.no_grad():
        log_floor = math.log(1e-8)
        seq = (torch.clamp(log_ratio, -20.0, 20.0) * maskf).sum(-1, keepdim=True)         # (B, 1)
        if vllm_is_ratio is not None:
            # Unmasked sum, as TRL: the engine ratios of padding are exp(0) = 1 by construction.
            seq = seq + torch.clamp(torch.log(vllm_is_ratio), log_floor, 20.0).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, log_floor, 20.0)
        nonneg = advantages >= 0                      # (B, 1), or (B, T) with per-token advantages
        k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
        lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _vespo_surrogate(o, coef_1, log_ratio, logps, adv, maskf, vllm_is_ratio):
    phi = vespo_gamma_weights(adv, log_ratio, maskf, vllm_is_ratio, o.vespo_k_pos, o.vespo_lambda_pos,
                              o.vespo_k_neg, o.vespo_lambda_neg)
    none = torch.zeros_like(logps, dtype=torch.bool)
    return Surrogate(-phi * adv * logps, none, none, phi)


# loss_type -> per-token surrogate from (options, ratio w, log_ratio, logps, advantages (B, 1)|(B, T),
# float mask, vllm_is_ratio)
SURROGATES = {"grpo": _clipped_surrogate, "bnpo": _clipped_surrogate, "dr_grpo": _clipped_surrogate,
              "dapo": _clipped_surrogate, "luspo": _clipped_surrogate, "cispo": _cispo_surrogate,
              "sapo": _sapo_surrogate, "vespo": _vespo_surrogate}


def off_policy_sequence_mask(advantages: torch.Tensor, logps: torch.Tensor, sampling_logps: torch.Tensor,
                             mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask, (B, 1) (or (B, T) with per-token advantages) in the
    log-probs' dtype: 1 keeps a sequence whose advantage is >= 0 or whose masked mean of
    ``sampling_logps - logps`` is <= ``threshold``; 0 drops it. Tokens without a sampling log-prob
    (NaN) count as 0 divergence."""
    maskf = mask.to(logps.dtype)
    div = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    mean_div = (div * maskf).sum(-1, keepdim=True) / maskf.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_div <= threshold)).to(logps.dtype)


def _gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``x`` concatenated (lengths may differ); ``x`` itself without a process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)                                   # host sync: the lengths
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, device=x.device, dtype=x.dtype)
    padded[:x.numel()] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Bool (B, T): unmasked tokens whose entropy is >= the (1 - ``quantile``) quantile of every
    unmasked token's entropy (all ranks' when a process group is initialised, as TRL gathers them).
    No unmasked token anywhere: all False."""
    valid = _gather_across_ranks(entropies[mask.bool()].float())
    if valid.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(valid, 1.0 - quantile)
    return ((entropies * mask.to(entropies.dtype)) >= threshold) & mask.bool()


@dataclass
class TokenTerms:
    """The per-token pieces of the loss (``per_token_grpo_loss``). Unpacks as the former 3-tuple
    ``(per_token, kl, clipped)``."""
    per_token: torch.Tensor            # (B, T) loss of each token, KL included, before the reduction
    kl: Optional[torch.Tensor]         # (B, T) k3 KL (times the ratio with use_bias_correction_kl) or None
    clipped: torch.Tensor              # (B, T) bool: low_clipped | high_clipped
    coef_1: torch.Tensor               # (B, T) or (B, 1): the importance ratio w
    low_clipped: torch.Tensor          # (B, T) or (B, 1) bool
    high_clipped: torch.Tensor         # (B, T) or (B, 1) bool
    phi: Optional[torch.Tensor] = None  # vespo's (B, 1) weight

    def __iter__(self):
        return iter((self.per_token, self.kl, self.clipped))


def per_token_grpo_loss(logps: torch.Tensor, old_logps: Optional[torch.Tensor],
                        ref_logps: Optional[torch.Tensor], advantages: torch.Tensor, mask: torch.Tensor,
                        options: GRPOLossOptions, vllm_is_ratio: Optional[torch.Tensor] = None, *,
                        entropy_mask: Optional[torch.Tensor] = None,
                        sampling_logps: Optional[torch.Tensor] = None) -> TokenTerms:
    """Per-token GRPO loss (B, T) and its pieces, in TRL's order (module docstring).

    ``advantages`` (B,) or (B, T); ``entropy_mask`` (B, T) bool, applied when given (see
    ``high_entropy_mask``); ``sampling_logps`` (B, T): the rollout engine's log-probs, used by the
    off-policy mask (default: ``old_logps``, then ``logps.detach()``).
    """
    o = options
    if old_logps is None:
        old_logps = logps.detach()
    log_ratio = logps - old_logps
    maskf = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv                           # (B, 1) or (B, T)
    coef_1 = torch.exp(LOG_WEIGHTS[o.importance_sampling_level](log_ratio, maskf))
    kl = None
    if o.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs reference log-probs")
        d = ref_logps - logps
        if o.kl_clamp is not None:
            d = torch.clamp(d, min=-o.kl_clamp, max=o.kl_clamp)
        kl = torch.exp(d) - d - 1
        if o.use_bias_correction_kl:
            # Unclipped ratio, gradient through it too: the unbiased reverse-KL gradient (token level).
            kl = kl * coef_1
    s = SURROGATES[o.loss_type](o, coef_1, log_ratio, logps, adv, maskf, vllm_is_ratio)
    per_token = s.per_token
    if o.off_policy_mask_threshold is not None:
        sampling = sampling_logps if sampling_logps is not None else old_logps
        per_token = per_token * off_policy_sequence_mask(adv, logps, sampling, mask, o.off_policy_mask_threshold)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.to(per_token.dtype)
    if vllm_is_ratio is not None and o.loss_type != "vespo":  # vespo folded it into phi
        per_token = per_token * vllm_is_ratio
    if kl is not None:
        per_token = per_token + o.beta * kl
    clipped = (s.low_clipped | s.high_clipped).expand_as(logps)
    return TokenTerms(per_token.expand_as(logps), kl, clipped, coef_1, s.low_clipped, s.high_clipped, s.phi)


def _reduce_grpo(per_token, maskf, options, num_items_in_batch):
    return ((per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).mean()


def _reduce_bnpo(per_token, maskf, options, num_items_in_batch):
    return (per_token * maskf).sum() / maskf.sum().clamp(min=1.0)


def _reduce_dr_grpo(per_token, maskf, options, num_items_in_batch):
    return (per_token * maskf).sum() / (per_token.shape[0] * options.max_completion_length)


def _reduce_dapo(per_token, maskf, options, num_items_in_batch):
    if num_items_in_batch is None:
        n = maskf.sum()
    else:  # at least 1, as TRL and Liger clamp it: a batch of masked completions gives 0, not NaN
        n = torch.as_tensor(num_items_in_batch, dtype=per_token.dtype, device=per_token.device)
    return (per_token * maskf).sum() / n.clamp(min=1.0)


def _reduce_luspo(per_token, maskf, options, num_items_in_batch):
    # Each sequence's loss weighted by its length (LUSPO): a masked token SUM per sequence, then the mean.
    return (per_token * maskf).sum(-1).mean()


# loss_type -> reduction of the (B, T) per-token losses to the scalar loss
REDUCTIONS = {"grpo": _reduce_grpo, "bnpo": _reduce_bnpo, "dr_grpo": _reduce_dr_grpo, "dapo": _reduce_dapo,
              "cispo": _reduce_dapo, "sapo": _reduce_grpo, "luspo": _reduce_luspo, "vespo": _reduce_dapo}
assert set(REDUCTIONS) == set(LOSS_TYPES) == set(SURROGATES) and set(LOG_WEIGHTS) == set(IS_LEVELS)
# The loss types normalised by the global completion-token count (``num_items_in_batch``).
GLOBAL_TOKEN_NORMALISED = tuple(k for k, f in REDUCTIONS.items() if f is _reduce_dapo)


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
                         num_items_in_batch=None, vllm_is_ratio: Optional[torch.Tensor] = None,
                         entropies: Optional[torch.Tensor] = None,
                         sampling_logps: Optional[torch.Tensor] = None) -> LossOutput:
    """The GRPO loss of differentiable per-token log-probs (B, T): the one place its math lives.

    ``options.temperature`` is not used: ``logps`` are already those of the tempered logits.
    Per-call tensors: ``vllm_is_ratio`` (B,), (B, 1) or (B, T), the rollout engine's importance
    ratio; ``entropies`` (B, T), needed when ``options.top_entropy_quantile < 1``;
    ``sampling_logps`` (B, T), the rollout engine's log-probs for ``off_policy_mask_threshold``.
    """
    B, T = logps.shape
    if vllm_is_ratio is not None:
        if vllm_is_ratio.dim() == 1:
            vllm_is_ratio = vllm_is_ratio.unsqueeze(-1)  # (B,) -> (B, 1), as TRL and Liger accept
        if vllm_is_ratio.dim() != 2 or vllm_is_ratio.shape[0] != B or vllm_is_ratio.shape[1] not in (1, T):
            raise ValueError(f"vllm_is_ratio must be ({B},), ({B}, 1) or ({B}, {T}), got {tuple(vllm_is_ratio.shape)}")
    entropy_mask = None
    if options.top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("GRPOLossOptions.top_entropy_quantile < 1 needs the per-token entropies (entropies=)")
        entropy_mask = high_entropy_mask(entropies, mask, options.top_entropy_quantile)
    terms = per_token_grpo_loss(logps, old_logps, ref_logps, advantages, mask, options, vllm_is_ratio,
                                entropy_mask=entropy_mask, sampling_logps=sampling_logps)
    loss = reduce_grpo_loss(terms.per_token, mask, options, num_items_in_batch)
    kl = terms.kl
    kl_mean = _masked_mean(kl.detach(), mask) if kl is not None else logps.new_zeros((), dtype=torch.float32)
    return LossOutput(loss, logps.detach(), kl_mean, _masked_mean(terms.clipped, mask),
                      entropies.detach() if entropies is not None else None)


def loss_metrics(out: LossOutput) -> dict:
    """The kernels' ``(loss, metrics)`` contract: per-token fp32 log-probs, mean KL, clip ratio (and
    the per-token entropies (B, T) under "entropy" when they were computed)."""
    m = {"per_token_logps": out.per_token_logps, "kl": out.kl, "clip_ratio": out.clip_ratio}
    if out.entropies is not None:
        m["entropy"] = out.entropies
    return m


# --------------------------------------------------------------------------------------------- #
# Plain-torch reference on hidden states
# --------------------------------------------------------------------------------------------- #


def eager_token_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0,
                        chunk_tokens: int = 1024) -> torch.Tensor:
    """No-grad entropy (B, T) of softmax(hidden @ weight.T / temperature), logits token-chunked
    (fp32 at least; float64 stays float64). The references' entropy; the kernels make it in their
    forward pass instead."""
    B, T, H = hidden.shape
    flat = hidden.detach().reshape(B * T, H)
    out = []
    with torch.no_grad():
        for s in range(0, B * T, chunk_tokens):
            z = flat[s:s + chunk_tokens] @ weight.detach().t()                  # (chunk, V)
            z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
            logp = torch.log_softmax(z, -1)
            out.append(-(logp.exp() * logp).sum(-1))
    if not out:
        return hidden.new_zeros((B, T), dtype=torch.float32)
    return torch.cat(out).view(B, T)


def grpo_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor,
                        advantages: torch.Tensor, old_logps: Optional[torch.Tensor] = None,
                        ref_logps: Optional[torch.Tensor] = None, options: Optional[GRPOLossOptions] = None, *,
                        num_items_in_batch=None, vllm_is_ratio: Optional[torch.Tensor] = None,
                        sampling_logps: Optional[torch.Tensor] = None, return_entropy: bool = False) -> LossOutput:
    """Plain-torch GRPO loss on hidden states (B, T, H): log-probs of token-chunked logits (at most
    1024 x V at a time, ``eager_token_logprobs``), autograd backward. float64 inputs stay float64.
    The entropies (``top_entropy_quantile < 1`` or ``return_entropy``) come from a second chunked
    no-grad pass."""
    options = options if options is not None else GRPOLossOptions()
    logps = eager_token_logprobs(hidden, weight, token_ids, options.temperature)
    entropies = None
    if return_entropy or options.top_entropy_quantile < 1.0:
        entropies = eager_token_entropy(hidden, weight, options.temperature)
    return grpo_loss_from_logps(logps, old_logps, ref_logps, advantages, mask, options,
                                num_items_in_batch=num_items_in_batch, vllm_is_ratio=vllm_is_ratio,
                                entropies=entropies, sampling_logps=sampling_logps)
