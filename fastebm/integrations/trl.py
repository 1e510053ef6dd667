"""TRL 1.16's ``GRPOTrainer`` with fastebm's fused GRPO loss: switch by changing one class name.

    from fastebm.integrations.trl import FusedGRPOTrainer      # instead of: from trl import GRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

What changes is the training loss (``_compute_loss``): the policy's per-token log-probs and
entropies come from fastebm's fused vocabulary kernel (``fastebm.kernels.linear_logprobs``, Triton
on CUDA, a chunked PyTorch path elsewhere) on the model's last hidden states and ``lm_head.weight``,
inside the model's forward, and the loss is ``fastebm.kernels.grpo_loss_from_logps`` with the
``GRPOConfig``'s settings (``loss_options_from_grpo_config``). Every loss option of TRL 1.16 is
honoured: the eight loss types, ``importance_sampling_level``, ``delta``, ``epsilon`` /
``epsilon_high``, ``beta``, ``use_bias_correction_kl``, the SAPO and VESPO knobs,
``top_entropy_quantile``, ``off_policy_mask_threshold``, the rollout-engine importance-sampling
ratio TRL computes (``vllm_importance_sampling_*``), tool masks, per-token advantages, and TRL's
normalisation over gradient accumulation and processes. The metrics TRL logs from its loss (kl,
entropy, clip ratios, cispo / vespo statistics) are logged the same way.

What stays TRL's: generation, rewards and advantages (``scale_rewards``,
``multi_objective_aggregation``, ``mask_truncated_completions``), the no-grad old / reference
scoring passes (TRL's own chunked fused head), logging, checkpointing.

Refused at construction with a ValueError naming what to change (the kernel cannot honour it):
the entropy bonus (``entropy_coef != 0``, ``use_adaptive_entropy``: it needs the entropy's
gradient, which the kernel does not compute), a Mixture-of-Experts router loss
(``router_aux_loss_coef``), models whose config soft-caps or scales the logits
(``final_logit_softcapping``, ``logit_scale``, ...), and DeepSpeed ZeRO-3 (the backward recomputes
logit tiles from ``lm_head.weight``, which ZeRO-3 partitions).
"""
from __future__ import annotations

import functools
import types
from typing import Optional

import torch
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from fastebm.kernels import GRPOLossOptions, grpo_loss_from_logps, linear_logprobs
from fastebm.kernels.grpo_semantics import GLOBAL_TOKEN_NORMALISED, per_token_grpo_loss

# Keys of TRL's batch the model's forward takes besides ids and mask (multimodal models); the loss
# runs on the whole local batch at once, so they pass unsliced.
MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")
# Model-config attributes that change the logits after the lm_head; the fused kernel computes
# plain (hidden @ weight.T + bias) / temperature.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def loss_options_from_grpo_config(args: GRPOConfig) -> GRPOLossOptions:
    """fastebm's loss settings for a TRL ``GRPOConfig`` (TRL's defaults stay TRL's: dapo,
    ``use_bias_correction_kl=True``, ``epsilon_high = epsilon`` when unset). A value fastebm refuses
    is a ValueError naming the GRPOConfig field."""
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    try:
        return GRPOLossOptions(
            beta=float(args.beta), epsilon_low=float(args.epsilon), epsilon_high=float(eps_high),
            temperature=float(args.temperature), loss_type=args.loss_type,
            importance_sampling_level=args.importance_sampling_level, delta=args.delta,
            max_completion_length=args.max_completion_length, use_bias_correction_kl=args.use_bias_correction_kl,
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg, top_entropy_quantile=float(args.top_entropy_quantile),
            off_policy_mask_threshold=args.off_policy_mask_threshold)
    except ValueError as e:
        field = str(e).split(" ")[0].removeprefix("GRPOLossOptions.").replace("epsilon_low", "epsilon")
        raise ValueError(f"GRPOConfig.{field}: {e}") from None


def _refuse_args(args: GRPOConfig) -> None:
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        raise ValueError("FusedGRPOTrainer: GRPOConfig.entropy_coef / use_adaptive_entropy (the entropy bonus) are not "
                         "supported: the bonus needs the gradient of the per-token entropy, which fastebm's fused "
                         "kernel does not compute. Set entropy_coef=0 and use_adaptive_entropy=False, or use "
                         "trl.GRPOTrainer.")


def _refuse_model(trainer: GRPOTrainer, model) -> None:
    text_config = model.config.get_text_config()
    for name in LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1.0 and not (name == "final_logit_softcapping" and value == 0.0):
            raise ValueError(f"FusedGRPOTrainer: the model config sets {name} = {value}; fastebm's fused kernel "
                             f"computes plain (hidden @ lm_head.weight.T + bias) / temperature. Use trl.GRPOTrainer "
                             f"for this model.")
    if trainer.aux_loss_enabled:
        raise ValueError("FusedGRPOTrainer: a Mixture-of-Experts router loss (GRPOConfig.router_aux_loss_coef / the "
                         "model's output_router_logits) is not supported; set router_aux_loss_coef=0.0.")
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError("FusedGRPOTrainer: DeepSpeed ZeRO-3 is not supported (the fused backward recomputes logit "
                         "tiles from lm_head.weight, which ZeRO-3 partitions); use ZeRO-1/2, FSDP or DDP.")


def add_fused_logprob_head(model, temperature: float, backend: str = "auto", cast_lm_head_to_fp32: bool = False):
    """Give ``model.forward`` a ``fastebm_completion_ids`` keyword: with it, the forward runs the
    backbone only and returns ``(logps, entropies)`` (B, C) fp32 of those completion tokens from
    fastebm's fused kernel (no logits; the entropies carry no gradient). Without it, the forward is
    the one it wraps (generation and TRL's scoring passes are unchanged). Going through the model's
    forward keeps DDP / FSDP's hooks around the lm_head's use."""
    inner = model.forward

    @functools.wraps(type(model).forward)  # the original signature: generate validates kwargs against it
    def forward(self, *args, fastebm_completion_ids: Optional[torch.Tensor] = None, **kwargs):
        if fastebm_completion_ids is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state          # (B, P + C, H)
        C = fastebm_completion_ids.shape[1]
        hidden = hidden[:, -C - 1:-1]                   # (B, C, H): position t predicts token t + 1
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):                 # FSDP2: the full head for the kernel
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden = hidden.to(weight.device)
        dev = hidden.device.type
        if cast_lm_head_to_fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(dev):            # what the lm_head's matmul would run in
            dtype = torch.get_autocast_dtype(dev)
        else:
            dtype = weight.dtype
        with torch.autocast(dev, enabled=False):
            return linear_logprobs(hidden.to(dtype), weight.to(dtype), fastebm_completion_ids.to(weight.device),
                                   temperature, bias=bias.to(dtype) if bias is not None else None, backend=backend,
                                   return_entropy=True)

    model.forward = types.MethodType(forward, model)


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is fastebm's fused GRPO loss (module docstring); same arguments,
    plus ``fastebm_backend`` ("auto" | "triton" | "torch", as every fastebm kernel)."""

    def __init__(self, *args, fastebm_backend: str = "auto", **kwargs):
        grpo_args = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        if grpo_args is not None:      # the cheap refusals before any model is built
            _refuse_args(grpo_args)
            loss_options_from_grpo_config(grpo_args)
        super().__init__(*args, **kwargs)
        _refuse_args(self.args)        # TRL builds a default GRPOConfig when none is given
        self.fastebm_options = loss_options_from_grpo_config(self.args)
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model  # as TRL patches it
        _refuse_model(self, policy)
        add_fused_logprob_head(policy, self.temperature, fastebm_backend, self.args.cast_lm_head_to_fp32)

    def _compute_loss(self, model, inputs):
        o = self.fastebm_options
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        extra = {k: inputs[k] for k in MODEL_INPUT_KEYS if inputs.get(k) is not None}
        logps, entropies = model(input_ids=input_ids, attention_mask=attention_mask,
                                 fastebm_completion_ids=completion_ids, **extra)        # (B, C) each

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_items = None
        if o.loss_type in GLOBAL_TOKEN_NORMALISED:
            # TRL's count spans the generation batch of every process: rescale it to this process's
            # accumulation window (the loss is then not divided by the accumulation steps).
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        # The rollout engine's ratio: TRL multiplies the loss by it when the correction is on, and vespo
        # folds whatever ratio the batch carries into its weights (TRL's inputs.get for vespo).
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
        else:
            is_ratio = inputs.get("importance_sampling_ratio") if o.loss_type == "vespo" else None
        per_call = dict(old=inputs.get("old_per_token_logps"),
                        ref=inputs["ref_per_token_logps"] if o.beta != 0.0 else None,
                        sampling=inputs.get("sampling_per_token_logps"))
        out = grpo_loss_from_logps(logps, per_call["old"], per_call["ref"], inputs["advantages"], mask, o,
                                   num_items_in_batch=num_items, vllm_is_ratio=is_ratio, entropies=entropies,
                                   sampling_logps=per_call["sampling"])
        loss = out.loss if o.loss_type in GLOBAL_TOKEN_NORMALISED else out.loss / accumulation
        self._log_loss_metrics(mode, logps.detach(), entropies, inputs["advantages"], mask, per_call, is_ratio)
        return loss

    @torch.no_grad()
    def _log_loss_metrics(self, mode, logps, entropies, advantages, mask, per_call, is_ratio):
        """The metrics TRL's ``_compute_loss`` logs, from the same per-token pieces (recomputed on the
        detached log-probs: O(B * T), no vocabulary work)."""
        o = self.fastebm_options
        t = per_token_grpo_loss(logps, per_call["old"], per_call["ref"], advantages, mask, o, is_ratio,
                                sampling_logps=per_call["sampling"])
        maskf = mask.to(logps.dtype)

        def masked_seq_mean(x):                          # (B,): one value per sequence
            x = x.to(logps.dtype)
            return x.squeeze(1) if x.shape[1] == 1 else (x * maskf).sum(-1) / maskf.sum(-1)

        def global_masked_mean(x):                       # over every process's tokens (or sequences)
            x = x.to(logps.dtype)
            if x.shape[1] == 1:
                stats = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device, dtype=x.dtype)])
            else:
                stats = torch.stack([(x * maskf).sum(), maskf.sum()])
            total = self.accelerator.reduce(stats, reduction="sum")
            return (total[0] / total[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if o.beta != 0.0:
            metrics["kl"].append(global_masked_mean(t.kl))
        metrics["entropy"].append(global_masked_mean(entropies))
        if o.loss_type in CLIP_LOSS_TYPES:
            low, high = t.low_clipped, t.high_clipped
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
            metrics["clip_ratio/region_mean"].append(global_masked_mean(low | high))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        elif o.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_masked_mean(t.high_clipped))
        elif o.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(t.phi))
