"""Rewards: a registry of named reward functions and their combination into advantages.

A reward is built once per run by its factory, ``factory(cfg.rewards, context) -> fn``, and called
once per step on the whole batch: ``fn(completions, inputs) -> list[float]`` with one value per
completion (prompt-major: the G completions of prompt 0, then prompt 1 …). Batched rewards (CLIP,
BERTScore, the PCG teacher) see the whole batch at once. A reward that fails raises.
"""
from fastebm.rewards.registry import REWARDS, RewardContext, RewardInputs, build_rewards, register
from fastebm.rewards import format as _format  # noqa: F401  (registers "format")
from fastebm.rewards import accuracy as _accuracy  # noqa: F401  (registers "accuracy")
from fastebm.rewards.format import extract_tag, format_reward

__all__ = ["REWARDS", "RewardContext", "RewardInputs", "build_rewards", "register", "format_reward",
           "extract_tag"]
