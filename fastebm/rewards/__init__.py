"""Rewards: a registry of named reward functions, built once per run and called once per step.

A reward is built by its factory, ``factory(cfg.rewards, context) -> fn``, and called on the whole
batch: ``fn(completions, inputs) -> list[float]`` with one value per completion (prompt-major: the G
completions of prompt 0, then prompt 1 …). Batched rewards (CLIP, BERTScore, the PCG teacher) see
the whole batch at once. A reward that needs the frozen teacher declares it (``register(name,
needs_teacher=True)``) and implements the teacher protocol (``TeacherRequest``), which lets the
trainer score its sequences inside the reference model's KL pass. A reward that fails raises; the
trainer runs each through ``call_reward``, which applies ``rewards.on_error``. Rewards written
outside fastebm register the same way and are imported through ``rewards.plugins``. See
docs/rewards.md.
"""
from fastebm.rewards.registry import (REWARDS, RewardContext, RewardError, RewardInputs, TeacherRequest, build_rewards,
                                      call_reward, check_rewards, finish_teacher_reward, guarded, load_plugins,
                                      needs_teacher, register, score_requests, uses_teacher)
from fastebm.rewards import format as _format  # noqa: F401  (registers "format")
from fastebm.rewards import accuracy as _accuracy  # noqa: F401  (registers "accuracy")
from fastebm.rewards import clip as _clip  # noqa: F401  (registers "clip")
from fastebm.rewards import pcg as _pcg  # noqa: F401  (registers "pcg")
from fastebm.rewards.format import format_reward
from fastebm.rewards.text import extract_tag

__all__ = ["REWARDS", "RewardContext", "RewardError", "RewardInputs", "TeacherRequest", "build_rewards", "call_reward",
           "check_rewards", "finish_teacher_reward", "guarded", "load_plugins", "needs_teacher", "register",
           "score_requests", "uses_teacher", "format_reward", "extract_tag"]
