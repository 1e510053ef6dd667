"""The fused loss's backward strategies side by side with Liger's chunked loss: forward + backward.

    python -m pytest bench/test_bench_backward.py -s          # prints each ratio to Liger and the prediction

Shapes as bench/test_bench_kernels.py: on CUDA the flagship T = 8 x 1024 tokens, H = 3584,
V = 152064, bf16 (the Triton kernels); on the CPU T = 2 x 1024, H = 64, V = 152064, fp32 (the
chunked PyTorch path: "gemm" its fixed panels, "atomic" / "sparse" its token x vocabulary chunk loop;
there are no atomics on a CPU). The logits are the benches' usual random ones (a flat softmax: "sparse"
skips nothing there, which the entry records). Each entry records its time ratio to Liger's
``LigerFusedLinearGRPOLoss`` (measured in the same session, ``compiled=False``) and, next to it, what
``fastebm.doctor.costs`` predicts at the H100's published rates (on a GPU; a CPU has no such model).
"""
from __future__ import annotations

import time

import pytest
import torch

from conftest import HAS_CUDA, device_name
from test_bench_kernels import KW, _inputs, fused_shape

_liger_seconds: dict = {}


def _call(provider):
    from fastebm.kernels import GRPOLossOptions, fused_linear_grpo_loss

    B, T, H, V, dtype = fused_shape()
    h0, w0, ids, mask, adv, old, ref = _inputs(B, T, H, V, dtype)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    stats = {}
    if provider == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        mod = LigerFusedLinearGRPOLoss(compiled=False, **KW)

        def loss():
            return mod(h, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    else:
        options = GRPOLossOptions(**KW)

        def loss():
            out, m = fused_linear_grpo_loss(h, w, ids, mask, adv, old, ref, options, backward=provider)
            stats["m"] = m
            return out

    def call():
        loss().backward()
        h.grad = w.grad = None
        if HAS_CUDA:
            torch.cuda.synchronize()
    return call, stats, (B * T, H, V, h0.element_size())


def _seconds(call, rounds=3):
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("provider", ["liger_chunked", "gemm", "atomic", "sparse"])
def test_backward_strategy_fwd_bwd(benchmark, provider):
    call, stats, (N, H, V, b) = _call(provider)
    call()                                        # warm-up (compilation, lazy imports)
    if "liger" not in _liger_seconds:             # the reference of every ratio, measured once per session
        liger, _, _ = _call("liger_chunked")
        liger()
        _liger_seconds["liger"] = _seconds(liger)
    benchmark.pedantic(call, rounds=3, iterations=1)
    ratio = benchmark.stats.stats.min / _liger_seconds["liger"]
    info = dict(device=device_name(), provider=provider, shape=f"N={N} H={H} V={V}", ratio_to_liger_min=ratio)
    if provider == "sparse" and "sparse_tiles" in stats.get("m", {}):
        skipped, total = stats["m"]["sparse_tiles"].tolist()
        info["sparse_skipped_fraction"] = skipped / max(total, 1)
    if HAS_CUDA and provider != "liger_chunked":
        from fastebm.doctor.costs import LossShape, strategy_costs

        info["predicted_ms_h100"] = strategy_costs(LossShape("bench", N, H, V, b), provider).time_s() * 1e3
    benchmark.extra_info.update(info)
    print(f"\n{provider}: min {benchmark.stats.stats.min:.3f} s, {ratio:.2f}x Liger's chunked loss "
          f"({_liger_seconds['liger']:.3f} s) {info.get('sparse_skipped_fraction', '')}")
