"""The reward registry and the inputs every reward receives."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

REWARDS: dict[str, Callable] = {}


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
    """What reward factories may need once per run (models, device, tags)."""
    tags: Sequence[str] = ("vision", "think", "answer")
    device: Any = "cpu"
    reference: Any = None        # the frozen reference/teacher (fastebm.model.loading.LoadedModel)


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


def build_rewards(names: Sequence[str], cfg, context: RewardContext) -> dict[str, Callable]:
    missing = [n for n in names if n not in REWARDS]
    if missing:
        raise KeyError(f"rewards.enabled: unknown reward(s) {missing}; available: {sorted(REWARDS)}")
    return {n: REWARDS[n](cfg, context) for n in names}
