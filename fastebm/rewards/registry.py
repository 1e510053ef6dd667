"""The reward registry, the inputs every reward receives, and how a failing reward is handled."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger("fastebm")

REWARDS: dict[str, Callable] = {}


class RewardError(RuntimeError):
    """A reward model failed (or returned the wrong number of values); the message names the reward."""


def register(name: str):
    """Decorator: register a reward factory ``factory(rewards_cfg, context) -> fn`` under ``name``."""
    def deco(factory):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} registered twice")
        REWARDS[name] = factory
        return factory
    return deco


@dataclass
class RewardContext:
    """What reward factories may need once per run (models, device, tags, caches)."""
    tags: Sequence[str] = ("vision", "think", "answer")
    device: Any = "cpu"
    reference: Any = None        # the frozen reference/teacher (fastebm.model.loading.LoadedModel)
    tiny_cache_dir: str = "~/.cache/fastebm/models"   # where tiny reward models are built (model.tiny_cache_dir)
    video_cache_dir: str = ""    # video.cache_dir: CLIP frame embeddings are cached beside the clips
    kernel: str = "fused"        # grpo.kernel: log-prob kernel of the PCG teacher pass
    shared_prefix: bool = False  # rollout.shared_prefix: teacher passes as one packed row per prompt


@dataclass
class RewardInputs:
    """One step's batch, as the rewards see it. Completions are prompt-major, G per prompt."""
    records: list                # per prompt: fastebm.data.records.Record
    group_size: int
    videos: list = field(default_factory=list)        # per prompt: the decoded VideoSample (frames shared)
    prompt_ids: list = field(default_factory=list)    # per prompt: token ids of the prompt
    completion_ids: Optional[list] = None             # per completion: token ids

    def record_of(self, i: int):
        """The record of completion ``i``."""
        return self.records[i // self.group_size]


_loaded_plugins: dict[str, object] = {}


def load_plugins(plugins: Sequence[str], source: str = "rewards.plugins") -> None:
    """Import each plug-in module (an importable name, or a ``.py`` file) once per process; the module
    registers its rewards with ``register`` when imported."""
    import importlib
    import importlib.util
    import os
    import sys

    from fastebm.config import ConfigError

    for entry in plugins:
        key = os.path.realpath(os.path.expanduser(entry)) if entry.endswith(".py") else entry
        if key in _loaded_plugins:
            continue
        try:
            if entry.endswith(".py"):
                if not os.path.isfile(key):
                    raise ConfigError(f"{source}: plug-in file {entry!r} not found")
                name = "fastebm_plugin_" + os.path.splitext(os.path.basename(key))[0]
                spec = importlib.util.spec_from_file_location(name, key)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(entry)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"{source}: importing plug-in {entry!r} failed: {type(e).__name__}: {e}") from e
        _loaded_plugins[key] = module


def check_rewards(cfg, source: str = "config", names: Optional[Sequence[str]] = None) -> None:
    """The ``[rewards]`` section against the registry (after importing ``cfg.plugins``): every enabled
    reward (or every one of ``names``) is registered. Raises ConfigError naming the key."""
    from fastebm.config import ConfigError

    load_plugins(cfg.plugins)
    for name in cfg.enabled if names is None else names:
        if name not in REWARDS:
            raise ConfigError(f"{source}: rewards.enabled: unknown reward {name!r}; available: {sorted(REWARDS)}"
                              + ("" if cfg.plugins else " (rewards.plugins imports modules that register more)"))


def build_rewards(names: Sequence[str], cfg, context: RewardContext) -> dict[str, Callable]:
    """The enabled rewards, each built once by its factory (after ``check_rewards``)."""
    names = list(names)
    check_rewards(cfg, names=names)
    return {n: REWARDS[n](cfg, context) for n in names}


def call_reward(name: str, fn: Callable, completions: list[str], inputs: RewardInputs,
                on_error: str = "raise") -> tuple[list[float], int]:
    """Run one reward on the batch: ``(values, errors)``.

    A reward that raises, or returns the wrong number of values: with ``on_error = "raise"`` a
    ``RewardError`` naming the reward; with ``"zero"`` every completion scores 0 for it and
    ``errors`` is the number of completions so zeroed (the trainer logs it as
    ``reward/<name>_errors``): a failure is never a silent 0.
    """
    n = len(completions)
    try:
        vals = [float(x) for x in fn(completions, inputs)]
        if len(vals) != n:
            raise RewardError(f"reward {name!r} returned {len(vals)} values for {n} completions")
    except Exception as e:
        if on_error != "zero":
            if isinstance(e, RewardError):
                raise
            raise RewardError(f"reward {name!r} failed: {type(e).__name__}: {e}") from e
        log.warning("reward %r failed (%s: %s); scoring %d completions 0 (rewards.on_error = 'zero')",
                    name, type(e).__name__, e, n)
        return [0.0] * n, n
    return vals, 0
