"""Kernel benchmarks: fastebm's kernels against PyTorch eager, torch.compile, Liger's Triton GRPO
loss and Liger's chunked fused-linear GRPO loss; time (pytest-benchmark) and peak memory.

    pytest bench/test_bench_kernels.py                       # CPU: scaled-down shapes, a few minutes
    pytest bench/test_bench_kernels.py --benchmark-json=k.json   # on a GPU: the flagship shapes
    pytest bench/test_bench_kernels.py -m quick              # only the guards (floors in bench/floors.toml)

Shapes: on CUDA the flagship T = 8 x 1024 completion tokens, H = 3584, V = 152064 (Qwen2-VL), bf16.
On the CPU the issue's side-by-side T = 2048, H = 64, V = 152064, fp32, forward + backward (and the
same shape for the scoring pass; a smaller logits shape for the logits loss). Providers that need
a GPU (Triton kernels, torch.compile) are skipped without one. Peak memory: see bench/conftest.py.

The "fastebm" provider is the trainer's entry point (``compute_grpo_loss`` / ``scoring_logprobs``)
with ``grpo.kernel`` of ``bench_config()``, so ``--fastebm-set grpo.kernel=eager`` routes it through
the eager path. Guards (``-m quick``): the loss fwd+bwd against Liger's chunked loss (time), its
peak memory growth against the full fp32 logits, and the scoring pass against PyTorch eager (time),
on the CPU at T = 512 (time) and 1,024 (memory) tokens, one torch thread, to stay quick and stable;
on CUDA at the flagship shape.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import (HAS_CUDA, bench_config, cpu_peak_rss_growth, cuda_peak_growth, device, device_name,
                      guard_threads)

HERE = os.path.abspath(__file__)
GPU_ONLY = {"compile", "liger_triton"}
KW = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo", temperature=1.0)


def fused_shape():
    # (B, T, H, V, dtype)
    return (8, 1024, 3584, 152064, torch.bfloat16) if HAS_CUDA else (2, 1024, 64, 152064, torch.float32)


def logits_shape():
    return (8, 1024, 152064, torch.bfloat16) if HAS_CUDA else (2, 256, 152064, torch.float32)


def _inputs(B, T, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = device()
    h = torch.randn(B, T, H, generator=g).to(dev, dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dev, dtype)
    ids = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = torch.ones(B, T, device=dev)
    adv = torch.randn(B, generator=g).to(dev)
    old = (torch.randn(B, T, generator=g) * 0.1 - 12).to(dev)
    ref = old + 0.05
    return h, w, ids, mask, adv, old, ref


# ------------------------------------------------------------------ providers (fwd + bwd) ------ #

def _eager_logps(h, w, ids, temperature=1.0):
    logits = (h @ w.t()).float() / temperature                      # (B, T, V): what we avoid
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)


def _eager_loss(h, w, ids, mask, adv, old, ref, options):
    from fastebm.kernels import grpo_loss_from_logps

    return grpo_loss_from_logps(_eager_logps(h, w, ids), old, ref, adv, mask, options).loss


_compiled = {}


def fused_linear_call(provider, B, T, H, V, dtype):
    """A no-argument fwd+bwd call of ``provider`` on fresh leaf tensors (built once, reused)."""
    from fastebm.kernels import GRPOLossOptions

    h0, w0, ids, mask, adv, old, ref = _inputs(B, T, H, V, dtype)
    h = h0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    options = GRPOLossOptions(**KW)

    if provider == "fastebm":  # the trainer's front-end: grpo.kernel decides fused or eager
        from fastebm.grpo.loss import compute_grpo_loss

        kernel = bench_config().grpo.kernel

        def loss():
            return compute_grpo_loss(h, w, ids, mask, adv, old, ref, options, kernel=kernel).loss
    elif provider == "eager":
        def loss():
            return _eager_loss(h, w, ids, mask, adv, old, ref, options)
    elif provider == "compile":
        fn = _compiled.setdefault("loss", torch.compile(_eager_loss))

        def loss():
            return fn(h, w, ids, mask, adv, old, ref, options)
    elif provider == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # compiled=False: Liger compiles only the O(B*T) loss math; the heavy part is the same.
        mod = LigerFusedLinearGRPOLoss(compiled=False, **KW)

        def loss():
            return mod(h, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    elif provider == "liger_triton":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def loss():
            logits = h @ w.t()                                       # Liger's kernel needs logits
            logits = torch.cat([logits, logits[:, :1]], 1)           # (B, T + 1, V) layout
            return triton_grpo_loss(logits, old, ref, ids, adv, mask, temperature=1.0, beta=KW["beta"],
                                    eps_low=KW["epsilon_low"], eps_high=KW["epsilon_high"], loss_type="dapo",
                                    reduce=True)[0]
    else:
        raise ValueError(provider)

    def call():
        loss().backward()
        h.grad = w.grad = None      # after, so each measured call allocates its own gradients
        if HAS_CUDA:
            torch.cuda.synchronize()
    return call


def token_logprobs_call(provider, B, T, H, V, dtype):
    h, w, ids, *_ = _inputs(B, T, H, V, dtype)
    if provider == "fastebm":  # the scoring passes' entry point: grpo.kernel decides fused or eager
        from fastebm.model.logprobs import scoring_logprobs

        kernel = bench_config().grpo.kernel

        def fn(h, w, ids):
            return scoring_logprobs(h, w, ids, kernel=kernel)
    elif provider == "eager":
        fn = _eager_logps
    elif provider == "compile":
        fn = _compiled.setdefault("logps", torch.compile(_eager_logps))
    elif provider == "liger_triton":
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

        def fn(h, w, ids):
            logits = h @ w.t()
            return fused_selective_log_softmax(torch.cat([logits, logits[:, :1]], 1), ids, 1.0)
    else:
        raise ValueError(provider)

    def call():
        with torch.no_grad():
            fn(h, w, ids)
        if HAS_CUDA:
            torch.cuda.synchronize()
    return call


def logits_loss_call(provider, B, T, V, dtype):
    g = torch.Generator().manual_seed(0)
    dev = device()
    logits = torch.randn(B, T, V, generator=g).to(dev, dtype).requires_grad_()
    _, _, ids, mask, adv, old, ref = _inputs(B, T, 8, V, torch.float32)
    from fastebm.kernels import GRPOLossOptions, grpo_loss_from_logps

    options = GRPOLossOptions(**KW)

    def eager(x):
        lp = torch.log_softmax(x.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
        return grpo_loss_from_logps(lp, old, ref, adv, mask, options).loss

    if provider == "fastebm":
        from fastebm.kernels import grpo_loss

        def loss():
            return grpo_loss(logits, ids, mask, adv, old, ref, options)[0]
    elif provider == "eager":
        def loss():
            return eager(logits)
    elif provider == "compile":
        fn = _compiled.setdefault("logits", torch.compile(eager))

        def loss():
            return fn(logits)
    elif provider == "liger_triton":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        padded = torch.cat([logits.detach(), logits.detach()[:, :1]], 1).requires_grad_()

        def loss():
            return triton_grpo_loss(padded, old, ref, ids, adv, mask, temperature=1.0, beta=KW["beta"],
                                    eps_low=KW["epsilon_low"], eps_high=KW["epsilon_high"], loss_type="dapo",
                                    inplace=False, reduce=True)[0]
    else:
        raise ValueError(provider)

    def call():
        loss().backward()
        logits.grad = None
        if HAS_CUDA:
            torch.cuda.synchronize()
    return call


# ---------------------------------------------------------------------------- bench entries --- #

def _bench(benchmark, factory, provider, shape, logits_bytes):
    if provider in GPU_ONLY and not HAS_CUDA:
        pytest.skip(f"{provider} needs a GPU")
    call = globals()[factory](provider, *shape)
    call()  # warm-up (Triton / torch.compile compilation, lazy imports)
    if HAS_CUDA:
        peak, method = cuda_peak_growth(call), "torch.cuda.max_memory_allocated growth"
    else:
        peak, method = cpu_peak_rss_growth(HERE, factory, provider, *shape), "subprocess peak RSS growth"
    benchmark.extra_info.update(device=device_name(), shape=str(shape), provider=provider,
                                peak_mem_bytes=peak, mem_method=method, logits_bytes=logits_bytes)
    benchmark.pedantic(call, rounds=3 if HAS_CUDA or provider != "eager" else 2, iterations=1)
    print(f"\n{factory} {provider} {shape}: peak growth {peak / 2**20:.0f} MiB "
          f"(full fp32 logits would be {logits_bytes / 2**20:.0f} MiB)")


@pytest.mark.parametrize("provider", ["fastebm", "liger_chunked", "eager", "compile", "liger_triton"])
def test_fused_linear_grpo_fwd_bwd(benchmark, provider):
    B, T, H, V, dtype = fused_shape()
    _bench(benchmark, "fused_linear_call", provider, (B, T, H, V, dtype), B * T * V * 4)


@pytest.mark.parametrize("provider", ["fastebm", "eager", "compile", "liger_triton"])
def test_token_logprobs_scoring(benchmark, provider):
    B, T, H, V, dtype = fused_shape()
    _bench(benchmark, "token_logprobs_call", provider, (B, T, H, V, dtype), B * T * V * 4)


@pytest.mark.parametrize("provider", ["fastebm", "eager", "compile", "liger_triton"])
def test_grpo_loss_logits_fwd_bwd(benchmark, provider):
    B, T, V, dtype = logits_shape()
    _bench(benchmark, "logits_loss_call", provider, (B, T, V, dtype), B * T * V * 4)


@pytest.mark.parametrize("provider", ["fastebm", "reference"])
def test_group_advantages(benchmark, provider):
    from fastebm.kernels import group_advantages, group_advantages_ref

    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 64 * 8, generator=g).to(device())       # 4 rewards, 64 prompts x 8 samples
    fn = group_advantages if provider == "fastebm" else group_advantages_ref
    benchmark.extra_info.update(device=device_name(), provider=provider)
    benchmark(lambda: fn(rewards, [1.0, 1.0, 0.8, 0.8], 8))


# ------------------------------------------------------------------------------------ guards --- #

def guard_shape(tokens: int):
    """(B, T, H, V, dtype) of a guard: the flagship shape on CUDA; one row of ``tokens`` on the CPU."""
    return fused_shape() if HAS_CUDA else (1, tokens, 64, 152064, torch.float32)


def _shape_str(shape) -> str:
    B, T, H, V, dtype = shape
    return f"B={B} T={T} H={H} V={V} {str(dtype).removeprefix('torch.')}"


@pytest.mark.quick
def test_guard_fused_loss_vs_liger_chunked(guard):
    shape = guard_shape(512)
    guard.speedup("fused_loss_speedup_vs_liger_chunked", op="grpo_loss_fwd_bwd", shape=_shape_str(shape),
                  reference=("liger_chunked", fused_linear_call("liger_chunked", *shape)),
                  fastebm=("fastebm", fused_linear_call("fastebm", *shape)), rounds=5)


@pytest.mark.quick
def test_guard_fused_loss_memory(guard):
    """Peak memory growth of the loss fwd+bwd (gradients included) as a fraction of the logits it avoids."""
    shape = guard_shape(1024)
    B, T, H, V, _ = shape
    logits = B * T * V * 4  # the full fp32 logits of the eager path (its gradient would double them)
    if HAS_CUDA:
        call = fused_linear_call("fastebm", *shape)
        call()
        peak = cuda_peak_growth(call)
    else:
        peak = cpu_peak_rss_growth(HERE, "fused_linear_call", "fastebm", *shape, threads=guard_threads())
    guard.row("grpo_loss_fwd_bwd", "fastebm", _shape_str(shape), "peak_mem_bytes", peak)
    guard.row("grpo_loss_fwd_bwd", "fp32 logits", _shape_str(shape), "bytes", logits)
    print(f"\nloss fwd+bwd peak growth {peak / 2**20:.0f} MiB, full fp32 logits {logits / 2**20:.0f} MiB")
    guard.check("fused_loss_logits_memory_multiple", logits / peak, op="grpo_loss_fwd_bwd",
                provider="fastebm/fp32 logits", shape=_shape_str(shape))


@pytest.mark.quick
def test_guard_scoring_logprobs_vs_eager(guard):
    shape = guard_shape(512)
    guard.speedup("scoring_logprobs_speedup_vs_eager", op="token_logprobs", shape=_shape_str(shape),
                  reference=("eager", token_logprobs_call("eager", *shape)),
                  fastebm=("fastebm", token_logprobs_call("fastebm", *shape)), rounds=7)
