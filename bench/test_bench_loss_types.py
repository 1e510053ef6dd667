"""The fused GRPO loss against Liger 0.8.5's chunked ``LigerFusedLinearGRPOLoss`` for the loss
types of issue 15: grpo, dapo, cispo and GSPO (grpo with sequence-level importance sampling);
forward + backward time (pytest-benchmark) and peak memory side by side.

    pytest bench/test_bench_loss_types.py                          # CPU: a few minutes
    pytest bench/test_bench_loss_types.py --benchmark-json=l.json  # on a GPU: the flagship shape

Shapes as ``test_bench_kernels.py``: on CUDA 8 x 1024 completion tokens, H = 3584, V = 152064,
bf16; on the CPU 2 x 1024 tokens, H = 64, V = 152064, fp32. Both providers get the same options,
old and reference log-probs (beta = 0.04, so the KL runs too). Peak memory: see bench/conftest.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import HAS_CUDA, cpu_peak_rss_growth, cuda_peak_growth, device, device_name

HERE = os.path.abspath(__file__)
COMMON = dict(beta=0.04, epsilon_low=0.2, temperature=1.0)
VARIANTS = {
    "grpo": dict(loss_type="grpo", epsilon_high=0.28),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),            # ScaleRL's cap
    "gspo": dict(loss_type="grpo", epsilon_high=0.28, importance_sampling_level="sequence"),
}


def shape():
    # (B, T, H, V, dtype)
    return (8, 1024, 3584, 152064, torch.bfloat16) if HAS_CUDA else (2, 1024, 64, 152064, torch.float32)


def loss_call(provider, variant, B, T, H, V, dtype):
    """A no-argument fwd+bwd call of ``provider`` for ``variant`` on leaf tensors built once."""
    g = torch.Generator().manual_seed(0)
    dev = device()
    h = torch.randn(B, T, H, generator=g).to(dev, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dev, dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = torch.ones(B, T, device=dev)
    adv = torch.randn(B, generator=g).to(dev)
    old = (torch.randn(B, T, generator=g) * 0.1 - 12).to(dev)
    ref = old + 0.05
    kw = dict(COMMON, **VARIANTS[variant])
    if provider == "fastebm":
        from fastebm.kernels import FusedLinearGRPOLoss
    elif provider == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss as FusedLinearGRPOLoss
        kw["compiled"] = False  # Liger compiles only the O(B*T) loss math; the heavy part is the same
    else:
        raise ValueError(provider)
    mod = FusedLinearGRPOLoss(**kw)

    def call():
        mod(h, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0].backward()
        h.grad = w.grad = None      # after, so each measured call allocates its own gradients
        if HAS_CUDA:
            torch.cuda.synchronize()
    return call


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("provider", ["fastebm", "liger_chunked"])
def test_loss_type_fwd_bwd(benchmark, provider, variant):
    args = (provider, variant, *shape())
    call = loss_call(*args)
    call()  # warm-up (Triton compilation, lazy imports)
    if HAS_CUDA:
        peak, method = cuda_peak_growth(call), "torch.cuda.max_memory_allocated growth"
    else:
        peak, method = cpu_peak_rss_growth(HERE, "loss_call", *args), "subprocess peak RSS growth"
    B, T, H, V, dtype = shape()
    benchmark.extra_info.update(device=device_name(), shape=str(shape()), provider=provider, variant=variant,
                                peak_mem_bytes=peak, mem_method=method, logits_bytes=B * T * V * 4)
    benchmark.pedantic(call, rounds=3, iterations=1)
    print(f"\n{variant} {provider}: peak growth {peak / 2**20:.0f} MiB")
