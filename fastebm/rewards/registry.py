"""The reward registry, the inputs every reward receives, the teacher protocol, and how a failing
reward is handled.

A reward is registered as a factory, ``factory(rewards_cfg, context) -> fn``, built once per run;
``fn(completions, inputs) -> list[float]`` scores one step's batch (one value per completion,
prompt-major). That call is the whole contract for most rewards.

The teacher protocol. A reward that needs the frozen teacher (the reference model) to score token
sequences after a prompt — PCG does — registers with ``needs_teacher=True`` (so the trainer loads
the reference model even when the KL weight is 0) and its ``fn`` also has two methods:

    fn.teacher_requests(completions, inputs) -> list[TeacherRequest]
    fn.score_with_teacher(completions, inputs, requests, logprobs) -> list[float]

The trainer collects every such reward's requests, scores them in the reference model's KL pass
(one packed forward per prompt group, the prompt's video + text prefix run once for the KL
completions and every request of that prompt), and hands each reward ``logprobs[j][k]``: the fp32
log-probs (temperature 1) of the tokens of ``requests[j].suffixes[k]``, given the prompt and the
suffix's preceding tokens. Called directly, ``fn(completions, inputs)`` runs the same requests on
its own (``score_requests``), so evaluation and tests use the same code path.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger("fastebm")

REWARDS: dict[str, Callable] = {}


class RewardError(RuntimeError):
    """A reward model failed (or returned the wrong number of values); the message names the reward."""


def register(name: str, *, needs_teacher: bool = False):
    """Decorator: register a reward factory ``factory(rewards_cfg, context) -> fn`` under ``name``.

    ``needs_teacher``: the reward uses the teacher protocol (see the module docstring); the trainer
    then loads the frozen reference model and passes it as ``context.reference``.
    """
    def deco(factory):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} registered twice")
        factory.needs_teacher = bool(needs_teacher)
        REWARDS[name] = factory
        return factory
    return deco


def needs_teacher(names: Sequence[str]) -> bool:
    """Whether any of the registered rewards ``names`` uses the teacher pass."""
    return any(getattr(REWARDS.get(n), "needs_teacher", False) for n in names)


def uses_teacher(fn) -> bool:
    """Whether a built reward implements the teacher protocol."""
    return callable(getattr(fn, "teacher_requests", None)) and callable(getattr(fn, "score_with_teacher", None))


@dataclass
class TeacherRequest:
    """Token sequences to score with the frozen teacher after prompt ``prompt`` of the batch."""
    prompt: int                                   # index of the prompt in RewardInputs.records
    suffixes: list[list[int]] = field(default_factory=list)   # token ids, each scored on its own after the prompt
    meta: Any = None                              # the reward's own bookkeeping, handed back unchanged


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


def guarded(name: str, thunk: Callable[[], Any], n: int, on_error: str = "raise") -> tuple[Any, bool]:
    """``(thunk(), True)``; when it raises: with ``on_error = "raise"`` a ``RewardError`` naming the
    reward, with ``"zero"`` a warning and ``(None, False)`` (the caller scores the ``n`` completions 0)."""
    try:
        return thunk(), True
    except Exception as e:
        if on_error != "zero":
            if isinstance(e, RewardError):
                raise
            raise RewardError(f"reward {name!r} failed: {type(e).__name__}: {e}") from e
        log.warning("reward %r failed (%s: %s); scoring %d completions 0 (rewards.on_error = 'zero')",
                    name, type(e).__name__, e, n)
        return None, False


def _values(name: str, vals, n: int) -> list[float]:
    out = [float(x) for x in vals]
    if len(out) != n:
        raise RewardError(f"reward {name!r} returned {len(out)} values for {n} completions")
    return out


def call_reward(name: str, fn: Callable, completions: list[str], inputs: RewardInputs,
                on_error: str = "raise") -> tuple[list[float], int]:
    """Run one reward on the batch: ``(values, errors)``.

    A reward that raises, or returns the wrong number of values: with ``on_error = "raise"`` a
    ``RewardError`` naming the reward; with ``"zero"`` every completion scores 0 for it and
    ``errors`` is the number of completions so zeroed (the trainer logs it as
    ``reward/<name>_errors``): a failure is never a silent 0.
    """
    n = len(completions)
    vals, ok = guarded(name, lambda: _values(name, fn(completions, inputs), n), n, on_error)
    return (vals, 0) if ok else ([0.0] * n, n)


def finish_teacher_reward(name: str, fn, completions: list[str], inputs: RewardInputs, requests: list[TeacherRequest],
                          logprobs: list[list[Any]], on_error: str = "raise") -> tuple[list[float], int]:
    """``fn.score_with_teacher`` under ``call_reward``'s failure rules: ``(values, errors)``."""
    n = len(completions)
    vals, ok = guarded(name, lambda: _values(name, fn.score_with_teacher(completions, inputs, requests, logprobs), n),
                       n, on_error)
    return (vals, 0) if ok else ([0.0] * n, n)


def score_requests(teacher, inputs: RewardInputs, requests: list[TeacherRequest], *, kernel: str = "fused",
                   shared_prefix: bool = True) -> list[list[Any]]:
    """Run teacher requests on their own: one forward per request (its prompt's prefix once when
    ``shared_prefix``). ``teacher``: a fastebm.model.loading.LoadedModel. The trainer does not call
    this: it scores the requests inside its reference pass."""
    from fastebm.model.forward import Prompt
    from fastebm.model.logprobs import suffix_logprobs

    pad = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
    out = []
    for r in requests:
        prompt = Prompt(inputs.prompt_ids[r.prompt], inputs.videos[r.prompt])
        scored = suffix_logprobs(teacher.model, [prompt], r.suffixes, [0] * len(r.suffixes), 1.0, kernel=kernel,
                                 shared_prefix=shared_prefix, pad_id=pad)
        out.append(scored.logprobs)
    return out
