"""Rewards: a registry of named reward functions and their combination into advantages.

A reward is built once per run by its factory, ``factory(cfg.rewards, context) -> fn``, and called
once per step on the whole batch: ``fn(completions, inputs) -> list[float]`` with one value per
completion (prompt-major: the G completions of prompt 0, then prompt 1 …). Batched rewards (CLIP,
BERTScore, the PCG teacher) see the whole batch at once. A reward that fails raises; the trainer
runs each through ``call_reward``, which applies ``rewards.on_error``. See docs/rewards.md.
"""
from fastebm.rewards.registry import (REWARDS, RewardContext, RewardError, RewardInputs, build_rewards, call_reward,
                                      check_rewards, load_plugins, register)
from fastebm.rewards import format as _format  # noqa: F401  (registers "format")
from fastebm.rewards import accuracy as _accuracy  # noqa: F401  (registers "accuracy")
from fastebm.rewards import clip as _clip  # noqa: F401  (registers "clip")
from fastebm.rewards import pcg as _pcg  # noqa: F401  (registers "pcg")
from fastebm.rewards.format import format_reward
from fastebm.rewards.text import extract_tag

__all__ = ["REWARDS", "RewardContext", "RewardError", "RewardInputs", "build_rewards", "call_reward", "check_rewards",
           "load_plugins", "register",
           "format_reward", "extract_tag"]
