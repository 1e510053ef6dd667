"""fastebm's Triton kernels, imported as ``fastebm.kernels``.

Each kernel file reads top to bottom: ``@triton.jit`` kernels -> launch wrapper -> autograd
Function -> public function -> plain-torch ``*_ref(..., upcast=False)``. Every public function takes
``backend="auto" | "triton" | "torch"``: ``auto`` runs Triton on CUDA tensors and a memory-bounded
PyTorch path elsewhere (``FASTEBM_KERNEL_BACKEND`` overrides it). Importing this package needs no
GPU. See docs/kernels.md.
"""
from .fused_linear_grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss, fused_linear_grpo_loss_ref
from .group_advantages import group_advantages, group_advantages_ref
from .logits_grpo_loss import grpo_loss, grpo_loss_ref
from .fused_linear_logprobs import linear_logprobs, token_logprobs, token_logprobs_ref

__all__ = [
    "FusedLinearGRPOLoss",
    "fused_linear_grpo_loss",
    "fused_linear_grpo_loss_ref",
    "grpo_loss",
    "grpo_loss_ref",
    "token_logprobs",
    "token_logprobs_ref",
    "linear_logprobs",
    "group_advantages",
    "group_advantages_ref",
]
