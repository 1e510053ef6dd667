"""Shared helpers for the kernel tests (imported as a plain module: tests/ has no packages).

The tolerance rule (STYLE.md): against the float64 reference, the kernel's error may be at most
twice PyTorch's own error at the input precision, plus a small atol -- for the output and every
gradient. Triton runs under TRITON_INTERPRET=1 here (tests/conftest.py sets it on CPU machines);
``backend="triton"`` forces the kernels, ``backend="torch"`` the chunked CPU path.

Device-generic: ``DEVICE`` is the machine's ("cuda" where a GPU is visible, else "cpu"), and
``make_batch`` builds its tensors there, so the same tests run the interpreter on a CPU and the
compiled kernels on CUDA tensors with the GPU's own dtypes (bf16 dots without widening:
``UPCAST_DOT`` is set only under the interpreter).
"""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["triton", "torch"]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3, torch.float64: 1e-10}


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_3way(out, ref64, torch_lowp, dtype, name="", atol=None):
    """max |out - ref64| <= 2 * max |torch_lowp - ref64| + atol, with a scale-aware atol."""
    scale = max(1.0, ref64.double().abs().max().item() if ref64.numel() else 1.0)
    a = (ATOL[dtype] if atol is None else atol) * scale
    e_k, e_t = err(out, ref64), err(torch_lowp, ref64)
    assert e_k <= 2 * e_t + a, f"{name}: kernel err {e_k:.3e} > 2 * torch err {e_t:.3e} + {a:.1e}"


def make_batch(B, T, H, V, dtype=torch.float32, seed=0, old=True, ref=True, masked_row=True,
               adv_zero=False, w_scale=None):
    """Hidden (B, T, H), weight (V, H), ids, a ragged mask (one fully masked row when B > 1),
    advantages and old/ref log-probs near the policy's own (so ratios straddle the clip range)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (w_scale if w_scale is not None else 2.0 / H ** 0.5)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    for b in range(B):
        mask[b, max(1, T - b * 3):] = 0
    if masked_row and B > 1:
        mask[-1] = 0
    adv = torch.zeros(B) if adv_zero else torch.randn(B, generator=g)
    with torch.no_grad():
        base = torch.log_softmax((hidden @ weight.t()).double(), -1).gather(-1, ids[..., None]).squeeze(-1).float()
    old_lp = (base + 0.3 * torch.randn(B, T, generator=g)) if old else None
    ref_lp = (base + 0.3 * torch.randn(B, T, generator=g)) if ref else None
    d = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), ids=ids, mask=mask, adv=adv, old=old_lp, ref=ref_lp)
    return {k: v.to(DEVICE) if v is not None else None for k, v in d.items()}


