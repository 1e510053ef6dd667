"""Models: loading (local checkpoints, tiny random models), forward passes, rollout."""
