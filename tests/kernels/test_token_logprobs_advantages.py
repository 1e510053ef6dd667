"""token_logprobs (scoring pass, with entropy) and group advantages against their references."""
from __future__ import annotations

import pytest
import torch

from fastebm.model.logprobs import scoring_logprobs
from fastebm.kernels import group_advantages, group_advantages_ref, token_logprobs, token_logprobs_ref

from kernel_helpers import BACKENDS, DEVICE, assert_3way, make_batch


# vocabulary splits are a Triton launch parameter: the torch path runs once per dtype
@pytest.mark.parametrize("backend,num_splits", [("triton", 1), ("triton", 3), ("triton", 1000), ("torch", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_and_entropy(backend, dtype, num_splits, small_tiles, monkeypatch):
    from fastebm.kernels import fused_linear_logprobs as ll

    real = ll.linear_logprob_fwd_triton
    monkeypatch.setattr(ll, "linear_logprob_fwd_triton", lambda *a, **k: real(*a, num_splits=num_splits, **k))
    b = make_batch(2, 9, 40, 1037, dtype=dtype, seed=1)
    out = token_logprobs(b["hidden"], b["weight"], b["ids"], 0.8, return_entropy=True, backend=backend)
    ref = token_logprobs_ref(b["hidden"], b["weight"], b["ids"], 0.8, return_entropy=True, upcast=True)
    low = token_logprobs_ref(b["hidden"], b["weight"], b["ids"], 0.8, return_entropy=True)
    for o, r, l, name in zip(out, ref, low, ["logp", "entropy"]):
        assert o.dtype == torch.float32 and o.shape == (2, 9) and not o.requires_grad
        assert_3way(o, r, l, dtype, name)


def test_scoring_logprobs_front_end_matches_reference():
    b = make_batch(2, 5, 16, 300, seed=6)
    a = scoring_logprobs(b["hidden"], b["weight"], b["ids"], 0.9, kernel="fused")
    r = scoring_logprobs(b["hidden"], b["weight"], b["ids"], 0.9, kernel="eager")
    torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["per_reward", "sum"])
@pytest.mark.parametrize("group_size", [1, 2, 5, 8])
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages(backend, normalize, group_size, scale):
    g = torch.Generator().manual_seed(group_size)
    names = ["format", "accuracy", "clip", "pcg"]
    rewards = {n: (torch.randn(4 * group_size, generator=g) * (i + 1)).to(DEVICE) for i, n in enumerate(names)}
    rewards["clip"][:group_size] = 0.5       # a constant group: std 0, advantage 0 (eps keeps it finite)
    weights = {"format": 1.0, "accuracy": 1.0, "clip": 0.8, "pcg": 0.8}
    out = group_advantages(rewards, weights, group_size, normalize, scale=scale, backend=backend)
    ref = group_advantages_ref(rewards, weights, group_size, normalize, scale=scale)
    assert out.dtype == torch.float32 and out.shape == (4 * group_size,)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if group_size == 1:
        assert out.abs().max().item() == 0.0


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError):
        group_advantages(torch.randn(2, 7, device=DEVICE), [1.0, 1.0], 4, backend="triton")
