"""The fused backward's strategies ("gemm", "atomic", "sparse"; ``BackwardOptions``) against the
float64 reference, the "gemm" strategy's bit-reproducibility (two runs, chunk sizes that do and do
not divide the panel count or the tokens), the "sparse" strategy's skipping on peaked and flat
softmaxes, and the deterministic switch. The Triton kernels run under the interpreter on a CPU
(tests/conftest.py) and natively on a GPU; "torch" is the chunked CPU path."""
from __future__ import annotations

import inspect

import pytest
import torch

from fastebm.kernels import (BackwardOptions, FusedLinearGRPOLoss, fused_linear_grpo_loss, fused_linear_grpo_loss_ref,
                            linear_logprobs)
from fastebm.kernels import fused_linear_logprobs as ll

from kernel_helpers import BACKENDS, DEVICE, assert_3way, make_batch
from test_fused_linear_grpo import CONFIGS, _batch, _run

STRATEGIES = ["gemm", "atomic", "sparse"]
# The quick loop runs two loss configurations per strategy; the full suite (slow) runs them all.
QUICK = {"grpo_token_kl_T07", "dapo_sequence"}
CFG_PARAMS = [pytest.param(c, marks=() if c in QUICK else pytest.mark.slow) for c in CONFIGS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["atomic", "sparse"])
@pytest.mark.parametrize("cfg_name", CFG_PARAMS)
def test_strategy_matches_float64_reference(strategy, backend, cfg_name, small_tiles):
    # Every loss type (grpo, bnpo, dr_grpo, dapo), T != 1, masked rows, V = 1037 and H = 40 (no tile
    # multiple), in bf16 (the GPU's dtype). "gemm", the default, runs every config in fp32, bf16 and
    # fp16 in test_fused_linear_grpo.py.
    cfg, dtype = CONFIGS[cfg_name], torch.bfloat16
    batch = _batch(cfg, dtype, (3, 7, 40, 1037))
    out = _run(fused_linear_grpo_loss, batch, cfg, dtype, backend=backend, backward=strategy)
    ref64 = _run(fused_linear_grpo_loss_ref, batch, cfg, dtype, upcast=True)
    lowp = _run(fused_linear_grpo_loss_ref, batch, cfg, dtype)
    for i, name in enumerate(["loss", "d_hidden", "d_weight"]):
        assert torch.isfinite(out[i]).all(), name
        assert_3way(out[i], ref64[i], lowp[i], dtype, f"{strategy}/{name}")


def _grads(batch, backend, backward, cfg=CONFIGS["grpo_token_kl_T07"]):
    loss, dh, dw, metrics = _run(fused_linear_grpo_loss, batch, cfg, batch["hidden"].dtype, backend=backend,
                                 backward=backward)
    return loss, dh, dw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.slow), torch.bfloat16])
def test_gemm_bit_identical_across_runs_and_chunk_sizes(backend, dtype, small_tiles):
    # N = 3 x 7 = 21 tokens: 2 row panels of 16 (the last ragged); V = 1037: 6 column panels of 192
    # (the last ragged); 12 panels. Chunks of 1, 5 panels (divides neither 12 nor N = 21) and all 12
    # at once must give the same bits; so must a second run.
    batch = make_batch(3, 7, 40, 1037, dtype=dtype, seed=4)
    panel_bytes = 16 * 192 * batch["hidden"].element_size()
    runs = {k: _grads(batch, backend, BackwardOptions(chunk_mb=k * panel_bytes / 2 ** 20)) for k in (1, 5, 12)}
    runs["again"] = _grads(batch, backend, BackwardOptions(chunk_mb=5 * panel_bytes / 2 ** 20))
    base = runs[1]
    assert base[2].abs().max() > 0
    for k, res in runs.items():
        for name, a, b in zip(["loss", "d_hidden", "d_weight"], res, base):
            assert torch.equal(a, b), f"chunk {k} panels: {name} differs by {(a - b).abs().max().item():.3e}"


def test_gemm_panel_plan_chunks_follow_the_budget():
    # 7B: N = 8192 tokens, V = 152064, bf16, GPU panels 8192 x 8192: 19 column panels of 128 MiB.
    p = ll.gemm_panel_plan(8192, 152064, ll.PANEL_GPU, 2, 512)
    assert (p["panel_rows"], p["panel_cols"], p["row_panels"], p["col_panels"]) == (8192, 8192, 1, 19)
    assert p["chunk"] == 4 and p["buffer_bytes"] == 4 * 8192 * 8192 * 2
    assert ll.gemm_panel_plan(8192, 152064, ll.PANEL_GPU, 2, 1)["chunk"] == 1          # at least one panel
    assert ll.gemm_panel_plan(100, 1037, (16, 192), 4, 1e6)["chunk"] == 7 * 6           # everything at once


class _LaunchSpy:
    def __init__(self):
        self.kernels = []

    def __call__(self, kernel, grid, *args, **kwargs):
        self.kernels.append(kernel)
        kernel[grid](*args, **kwargs)


def _jit_sources(kernel) -> str:
    """Source of a @triton.jit kernel and of every @triton.jit helper of this file it calls."""
    fn = getattr(kernel, "fn", kernel)
    src = inspect.getsource(fn)
    for name in ("_dot", "_logit_tile", "_dlogit_tile"):
        if f"{name}(" in src:
            src += inspect.getsource(getattr(ll, name).fn)
    return src


def test_gemm_launches_no_atomics_and_matches_reference(monkeypatch, small_tiles):
    # The deterministic strategy: the only kernel it launches is the d-logits kernel, whose source
    # (helpers included) has no atomic operation; the products are dense GEMMs. The atomic strategy
    # launches the atomic kernel (the spy can tell them apart). Compiled for sm_80 / sm_90, the
    # d-logits kernel's PTX has no atom/red instruction either (tests/doctor/test_compile_gate.py).
    spy = _LaunchSpy()
    monkeypatch.setattr(ll, "launch", spy)
    cfg = CONFIGS["dapo_sequence"]
    batch = _batch(cfg, torch.float32, (2, 9, 24, 531))
    out = _run(fused_linear_grpo_loss, batch, cfg, torch.float32, backend="triton",
               backward=BackwardOptions(deterministic=True))
    bwd = [k for k in spy.kernels if k is not ll._linear_logprob_fwd_kernel]
    assert bwd and all(k is ll._linear_logprob_dlogits_kernel for k in bwd)
    assert "tl.atomic_" not in _jit_sources(ll._linear_logprob_dlogits_kernel)
    assert "tl.atomic_add" in _jit_sources(ll._linear_logprob_bwd_kernel)      # the scan can see one
    ref64 = _run(fused_linear_grpo_loss_ref, batch, cfg, torch.float32, upcast=True)
    low = _run(fused_linear_grpo_loss_ref, batch, cfg, torch.float32)
    for i, name in enumerate(["loss", "d_hidden", "d_weight"]):
        assert_3way(out[i], ref64[i], low[i], torch.float32, name)
    spy.kernels.clear()
    _run(fused_linear_grpo_loss, batch, cfg, torch.float32, backend="triton", backward="atomic")
    assert ll._linear_logprob_bwd_kernel in spy.kernels and ll._linear_logprob_dlogits_kernel not in spy.kernels


def _zipf_batch(B, T, H, V, seed, exponent):
    """A trained-model-like softmax: token v's logit carries a popularity term -exponent * log(1 + v)
    (BPE vocabularies number their merges in frequency order, so frequent tokens have low ids), plus
    a per-row part of std ~1; the selected tokens are sampled from the softmax itself. exponent = 0
    with tiny weights is a flat softmax."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    hidden[..., 0] = 1.0
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    weight[:, 0] = -exponent * torch.log1p(torch.arange(V, dtype=torch.float32))
    if exponent == 0:
        weight *= 0.02
    with torch.no_grad():
        p = torch.softmax(hidden @ weight.t(), -1)
    ids = torch.multinomial(p.view(-1, V), 1, generator=g).view(B, T)
    b = make_batch(B, T, H, V, seed=seed, masked_row=False)
    b.update(hidden=hidden.to(DEVICE), weight=weight.to(DEVICE), ids=ids.to(DEVICE))
    with torch.no_grad():
        base = torch.log_softmax((hidden @ weight.t()).double(), -1).gather(-1, ids[..., None]).squeeze(-1).float()
    b["old"] = (base + 0.2 * torch.randn(B, T, generator=g)).to(DEVICE)
    b["ref"] = (base + 0.2 * torch.randn(B, T, generator=g)).to(DEVICE)
    return b


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_skips_most_tiles_of_a_peaked_softmax_and_none_of_a_flat_one(backend, small_tiles):
    cfg, dtype = CONFIGS["grpo_token_kl_T07"], torch.bfloat16
    fractions = {}
    for name, exponent in (("peaked", 3.0), ("flat", 0.0)):
        b = _zipf_batch(2, 12, 32, 2053, seed=9, exponent=exponent)
        b["hidden"], b["weight"] = b["hidden"].to(dtype), b["weight"].to(dtype)
        loss, dh, dw, metrics = _run(fused_linear_grpo_loss, b, cfg, dtype, backend=backend, backward="sparse")
        skipped, total = metrics["sparse_tiles"].tolist()
        assert total > 0
        fractions[name] = skipped / total
        ref64 = _run(fused_linear_grpo_loss_ref, b, cfg, dtype, upcast=True)
        low = _run(fused_linear_grpo_loss_ref, b, cfg, dtype)
        for i, out in enumerate([loss, dh, dw]):
            assert_3way(out, ref64[i], low[i], dtype, f"{name}/{['loss', 'd_hidden', 'd_weight'][i]}")
    assert fractions["peaked"] > 0.75, fractions
    assert fractions["flat"] == 0.0, fractions


def test_deterministic_refuses_float_atomics():
    for strategy in ("atomic", "sparse"):
        with pytest.raises(ValueError, match=f"'{strategy}'.*float atomics.*deterministic=True needs 'gemm'"):
            BackwardOptions(strategy=strategy, deterministic=True)
        with pytest.raises(ValueError, match="float atomics"):
            FusedLinearGRPOLoss(backward=strategy, deterministic=True)
    assert BackwardOptions(deterministic=True).strategy == "gemm"
    with pytest.raises(ValueError, match="one of"):
        BackwardOptions(strategy="fast")
    with pytest.raises(ValueError, match="chunk_mb"):
        BackwardOptions(chunk_mb=0)
    with pytest.raises(TypeError, match="BackwardOptions"):
        linear_logprobs(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), backward=1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_module_backward_keyword_reaches_the_kernel(strategy, monkeypatch, small_tiles):
    # FusedLinearGRPOLoss(backward=..., backward_chunk_mb=...) is what the backward runs.
    seen = []
    real = ll.linear_logprob_bwd_torch
    monkeypatch.setattr(ll, "linear_logprob_bwd_torch", lambda *a, **k: seen.append(k["backward"]) or real(*a, **k))
    b = make_batch(2, 5, 16, 300, seed=3)
    mod = FusedLinearGRPOLoss(beta=0.04, loss_type="bnpo", backend="torch", backward=strategy, backward_chunk_mb=64)
    h = b["hidden"].clone().requires_grad_()
    loss, _ = mod(h, b["weight"], b["ids"], b["mask"], b["adv"], ref_per_token_logps=b["ref"],
                  old_per_token_logps=b["old"])
    loss.backward()
    assert seen == [BackwardOptions(strategy=strategy, chunk_mb=64)]
