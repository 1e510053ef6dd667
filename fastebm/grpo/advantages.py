"""Group-relative advantages of the trainer's named rewards.

EBM-RL normalises every reward *within its group separately* and then takes the weighted sum
(``normalize="per_reward"``, DESIGN.md §1); standard GRPO sums the weighted rewards first and
normalises the sum (``normalize="sum"``). The implementation is the kernels' plain-torch reference,
``fastebm.kernels.combine_rewards`` (Bessel-corrected group std, like TRL; float64 inside; a group
of size 1 gets advantage 0).
"""
from __future__ import annotations

from typing import Mapping

import torch

from fastebm.kernels import combine_rewards as _combine_rewards


def combine_rewards(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float], group_size: int,
                    normalize: str = "per_reward", eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Advantages (N,) fp32 from named per-sample rewards (each (N,)) and their weights.

    ``per_reward``: sum_k w_k * znorm_group(r_k)   (EBM-RL)
    ``sum``:        znorm_group(sum_k w_k * r_k)    (standard GRPO)
    """
    return _combine_rewards(rewards, weights, group_size, normalize, eps, scale)
