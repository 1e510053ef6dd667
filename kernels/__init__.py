"""fastebm's Triton kernels, imported as ``fastebm.kernels``.

Each kernel file reads top to bottom: ``@triton.jit`` kernels -> launch wrapper -> autograd
Function -> public function -> plain-torch ``*_ref(..., upcast=False)``. Every public function takes
``backend="auto" | "triton" | "torch"``: ``auto`` runs Triton on CUDA tensors and a memory-bounded
PyTorch path elsewhere (``FASTEBM_KERNEL_BACKEND`` overrides it). The fused-linear losses also take
``backward="gemm" | "atomic" | "sparse"`` (or ``BackwardOptions``): how the backward computes the
hidden and weight gradients. Importing this package needs no GPU. See docs/kernels.md.

``grpo_semantics.py`` holds what every GRPO loss here means: ``GRPOLossOptions`` (the settings, one
object), the per-token loss and its reductions, ``grpo_loss_from_logps`` (which every GRPO kernel
finishes through) and the plain-torch reference on hidden states. The package stands alone: it
imports only torch, triton, the standard library and its own files (never ``fastebm``), so it can be
copied into other GRPO code as it is (tests/kernels/test_standalone.py checks both).
"""
from .fused_linear_grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss, fused_linear_grpo_loss_ref
from .group_advantages import combine_rewards, group_advantages, group_advantages_ref, group_normalize
from .grpo_semantics import GRPOLossOptions, LossOutput, grpo_loss_from_logps, grpo_loss_reference
from .logits_grpo_loss import grpo_loss, grpo_loss_ref
from .fused_linear_logprobs import (BACKWARD_STRATEGIES, BackwardOptions, linear_logprobs, token_logprobs,
                                    token_logprobs_ref)

__all__ = [
    "BACKWARD_STRATEGIES",
    "BackwardOptions",
    "GRPOLossOptions",
    "LossOutput",
    "FusedLinearGRPOLoss",
    "fused_linear_grpo_loss",
    "fused_linear_grpo_loss_ref",
    "grpo_loss",
    "grpo_loss_ref",
    "grpo_loss_from_logps",
    "grpo_loss_reference",
    "token_logprobs",
    "token_logprobs_ref",
    "linear_logprobs",
    "group_advantages",
    "group_advantages_ref",
    "combine_rewards",
    "group_normalize",
]
