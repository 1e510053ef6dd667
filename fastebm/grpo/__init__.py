"""GRPO: group advantages and the loss front-end (plain-torch eager path or fused Triton kernels)."""
from fastebm.grpo.advantages import combine_rewards, group_normalize
from fastebm.grpo.loss import LossOutput, compute_grpo_loss

__all__ = ["combine_rewards", "group_normalize", "LossOutput", "compute_grpo_loss"]
