"""Group-relative advantages from K named rewards in one kernel launch.

    adv = group_advantages(rewards (K, N), weights (K,), group_size, normalize="per_reward"|"sum")

per_reward (EBM-RL): sum_k w_k * (r_k - mean_g(r_k)) / (std_g(r_k) + eps)
sum (standard GRPO): (s - mean_g(s)) / (std_g(s) + eps),  s = sum_k w_k * r_k
Bessel-corrected std (like TRL's ``torch.std``); ``scale=False`` only centres (Dr. GRPO's choice);
a group of size 1 (std undefined) gets advantage 0 rather than NaN. Kernel grid: one program per
group, the (K, G) block of rewards in registers, fp32. The semantics are ``combine_rewards`` at the
bottom of this file (the plain-torch reference, float64 inside).
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
import triton
import triton.language as tl

from ._backend import launch, resolve_backend


@triton.jit
def _group_advantages_kernel(R, WTS, OUT, K, N, G, eps, PER_REWARD: tl.constexpr, SCALE: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    grp = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    cols = grp * G + tl.arange(0, BLOCK_G)
    k_ok = ks < K
    g_ok = tl.arange(0, BLOCK_G) < G
    ok = k_ok[:, None] & g_ok[None, :]
    r = tl.load(R + ks[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)   # (K, G)
    w = tl.load(WTS + ks, mask=k_ok, other=0.0).to(tl.float32)
    if not PER_REWARD:  # standard GRPO: one summed reward per sample
        r = tl.sum(r * w[:, None], 0)[None, :]
        ok = g_ok[None, :]
        w = tl.full([1], 1.0, tl.float32)
    mean = tl.sum(r, 1) / G
    c = tl.where(ok, r - mean[:, None], 0.0)
    if SCALE:
        std = tl.sqrt(tl.sum(c * c, 1) / tl.maximum(G - 1, 1))
        c = c / (std[:, None] + eps)
    adv = tl.sum(c * w[:, None], 0)
    tl.store(OUT + cols, adv, mask=g_ok)


def _stack(rewards, weights):
    if isinstance(rewards, Mapping):
        names = list(rewards)
        missing = [n for n in names if n not in weights]
        if missing:
            raise KeyError(f"no weight for reward(s) {missing}")
        return torch.stack([rewards[n].float() for n in names]), [float(weights[n]) for n in names]
    r = rewards if rewards.ndim == 2 else rewards[None]
    w = [float(x) for x in (weights if not isinstance(weights, torch.Tensor) else weights.tolist())]
    return r.float(), w


def group_advantages_triton(rewards: torch.Tensor, weights: Sequence[float], group_size: int,
                            normalize: str = "per_reward", eps: float = 1e-4, scale: bool = True):
    """(N,) fp32 advantages from stacked rewards (K, N)."""
    K, N = rewards.shape
    if len(weights) != K:
        raise ValueError(f"{K} rewards but {len(weights)} weights")
    if N % group_size:
        raise ValueError(f"{N} samples do not split into groups of {group_size}")
    if normalize not in ("per_reward", "sum"):
        raise ValueError(f"normalize must be 'per_reward' or 'sum', got {normalize!r}")
    out = torch.empty(N, device=rewards.device, dtype=torch.float32)
    if group_size == 1:
        return out.zero_()
    wts = torch.tensor(weights, device=rewards.device, dtype=torch.float32)
    launch(_group_advantages_kernel, (N // group_size,),
        rewards.contiguous(), wts, out, K, N, group_size, eps, PER_REWARD=normalize == "per_reward",
        SCALE=scale, BLOCK_K=max(2, triton.next_power_of_2(K)), BLOCK_G=max(2, triton.next_power_of_2(group_size)))
    return out


def group_advantages(rewards: Union[Mapping[str, torch.Tensor], torch.Tensor],
                     weights: Union[Mapping[str, float], Sequence[float], torch.Tensor], group_size: int,
                     normalize: str = "per_reward", eps: float = 1e-4, scale: bool = True,
                     backend: str = "auto") -> torch.Tensor:
    """Advantages (N,) fp32 from named rewards {name: (N,)} and weights {name: w}, or a (K, N) stack
    and K weights. Triton on CUDA, the torch reference elsewhere (it is tiny work either way)."""
    r, w = _stack(rewards, weights)
    if resolve_backend(backend, r.device) == "triton":
        return group_advantages_triton(r, w, group_size, normalize, eps, scale)
    return group_advantages_ref(r, w, group_size, normalize, eps, scale)


# --------------------------------------------------------------------------------------------- #
# Plain-torch reference
# --------------------------------------------------------------------------------------------- #


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

    ``per_reward``: sum_k w_k * znorm_group(r_k)   (EBM-RL)
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


def group_advantages_ref(rewards, weights, group_size: int, normalize: str = "per_reward",
                         eps: float = 1e-4, scale: bool = True, backend: str = "auto", upcast: bool = False):
    """``combine_rewards`` on the same inputs (it computes in float64)."""
    del backend, upcast
    r, w = _stack(rewards, weights)
    named = {str(k): r[k] for k in range(r.shape[0])}
    return combine_rewards(named, {str(k): w[k] for k in range(len(w))}, group_size, normalize, eps, scale)
