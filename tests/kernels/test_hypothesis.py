"""Property tests over shapes and hyper-parameters: both backends agree with the float64 reference
(fp32 inputs, so the tolerance is the fp32 3-way rule)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastebm.kernels import fused_linear_grpo_loss, fused_linear_grpo_loss_ref

from kernel_helpers import assert_3way, make_batch

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 9))
    H = draw(st.sampled_from([8, 16, 24, 40]))
    V = draw(st.integers(17, 700))
    cfg = dict(
        beta=draw(st.sampled_from([0.0, 0.04, 0.3])),
        epsilon_low=draw(st.floats(0.05, 0.4)),
        epsilon_high=draw(st.floats(0.05, 0.5)),
        temperature=draw(st.sampled_from([0.5, 0.9, 1.0, 1.7])),
        loss_type=draw(st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"])),
        importance_sampling_level=draw(st.sampled_from(["token", "sequence"])),
        delta=draw(st.sampled_from([None, 1.1, 2.0])),
    )
    cfg["max_completion_length"] = T + draw(st.integers(0, 4)) if cfg["loss_type"] == "dr_grpo" else None
    old = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    return (B, T, H, V), cfg, old, seed


def _run(fn, b, cfg, **kw):
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    loss, m = fn(h, w, b["ids"], b["mask"], b["adv"], b["old"], b["ref"], **cfg, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, m["per_token_logps"]


def _check(problem, backend):
    shape, cfg, old, seed = problem
    b = make_batch(*shape, seed=seed, old=old, ref=cfg["beta"] != 0.0)
    out = _run(fused_linear_grpo_loss, b, cfg, backend=backend)
    ref = _run(fused_linear_grpo_loss_ref, b, cfg, upcast=True)
    low = _run(fused_linear_grpo_loss_ref, b, cfg)
    for o, r, l, name in zip(out, ref, low, ["loss", "d_hidden", "d_weight", "logps"]):
        assert torch.isfinite(o).all(), name
        assert_3way(o, r, l, torch.float32, name)


@pytest.mark.slow
@settings(max_examples=50, **SETTINGS)
@given(problem=problems())
def test_property_triton(problem, small_tiles):
    _check(problem, "triton")


@settings(max_examples=80, **SETTINGS)
@given(problem=problems())
def test_property_torch_chunked(problem, monkeypatch):
    from fastebm.kernels import fused_linear_logprobs as ll

    monkeypatch.setattr(ll, "CHUNK_TOKENS", 4)      # many token and vocabulary chunks
    monkeypatch.setattr(ll, "CHUNK_ELEMS", 4 * 96)
    _check(problem, "torch")
