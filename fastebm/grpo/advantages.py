"""Group-relative advantages.

EBM-RL normalises every reward *within its group separately* and then takes the weighted sum
(``normalize="per_reward"``); standard GRPO sums the weighted rewards first and normalises the sum
(``normalize="sum"``). Both use the Bessel-corrected group std, like TRL (``torch.std``), and a group
of size 1 (std undefined) gets advantage 0 rather than NaN.
"""
from __future__ import annotations

from typing import Mapping

import torch


def group_normalize(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                    scale: bool = True) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for ``rewards`` of shape (num_groups * group_size,).

    ``scale=False`` only centres (Dr. GRPO's choice). Groups of size 1 give 0.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.double().view(-1, group_size)  # (num_groups, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.view(-1).float()


def combine_rewards(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float], group_size: int,
                    normalize: str = "per_reward", eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Advantages (N,) from named per-sample rewards (each (N,)).

    ``per_reward``: sum_k w_k * znorm_group(r_k)   (EBM-RL, DESIGN.md §1)
    ``sum``:        znorm_group(sum_k w_k * r_k)    (standard GRPO)
    """
    if not rewards:
        raise ValueError("no rewards to combine")
    names = list(rewards)
    missing = [n for n in names if n not in weights]
    if missing:
        raise KeyError(f"no weight for reward(s) {missing}")
    if normalize == "per_reward":
        return sum(weights[n] * group_normalize(rewards[n].float(), group_size, eps, scale) for n in names)
    if normalize == "sum":
        total = sum(weights[n] * rewards[n].double() for n in names)
        return group_normalize(total, group_size, eps, scale)
    raise ValueError(f"normalize must be 'per_reward' or 'sum', got {normalize!r}")
