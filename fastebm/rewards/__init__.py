"""Reward registry (filled in below by the reward modules)."""
REWARDS: dict = {}
