"""Training: the GRPO trainer, checkpoints, metrics."""
