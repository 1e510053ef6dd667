"""GRPO's trainer-facing front-end: loss options from the ``[grpo]`` config, the loss call (eager
or fused) and group advantages. The loss and the advantages themselves live in ``fastebm.kernels``."""
from fastebm.grpo.advantages import combine_rewards
from fastebm.grpo.loss import LossOutput, backward_options, compute_grpo_loss, loss_options

__all__ = ["combine_rewards", "LossOutput", "backward_options", "compute_grpo_loss", "loss_options"]
