"""Cascade attention (shared prefix + per-sample suffix, merged by log-sum-exp) against SDPA.

The Triton kernels run under TRITON_INTERPRET=1 here (tests/conftest.py); shapes are small and odd:
prefix lengths not a multiple of the block, grouped-query heads, n = 0 suffix tokens, head dim
not a power of two.
"""
import pytest
import torch

from fastebm.kernels.cascade_attention import (cascade_attention, cascade_attention_ref,
                                               cascade_attention_torch, cascade_attention_triton)


def make(G, Hq, Hkv, P, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return r(G, Hq, D), r(Hkv, P, D), r(Hkv, P, D), r(G, Hkv, T, D), r(G, Hkv, T, D)


SHAPES = [  # G, Hq, Hkv, P, T, n, D
    (4, 4, 2, 37, 8, 5, 16),
    (3, 6, 2, 70, 6, 0, 24),     # no suffix yet (first decode step), D not a power of 2
    (8, 2, 2, 16, 4, 4, 32),     # MHA, full buffer
    (1, 8, 1, 129, 3, 1, 8),     # MQA, prefix just over two blocks
]


@pytest.mark.filterwarnings("ignore:divide by zero")  # log(0) = -inf for n = 0, by design
@pytest.mark.parametrize("G,Hq,Hkv,P,T,n,D", SHAPES)
@pytest.mark.parametrize("impl", [cascade_attention_torch, cascade_attention_triton], ids=["torch", "triton"])
def test_fp32_matches_sdpa(impl, G, Hq, Hkv, P, T, n, D):
    args = make(G, Hq, Hkv, P, T, D, torch.float32)
    ref = cascade_attention_ref(*args, n, upcast=True)
    out = impl(*args, n)
    assert out.shape == (G, Hq, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [cascade_attention_torch, cascade_attention_triton], ids=["torch", "triton"])
def test_bf16_three_way_rule(impl):
    """Error vs the fp64 reference at most 2x PyTorch's own bf16 SDPA error, plus a small atol."""
    args = make(4, 4, 2, 45, 7, 32, torch.bfloat16, seed=3)
    ref = cascade_attention_ref(*args, 6, upcast=True)
    torch_bf16 = cascade_attention_ref(*args, 6)
    out = impl(*args, 6)
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs().max().item()
    base = (torch_bf16.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3, (err, base)


def test_public_dispatch_and_shape_errors():
    args = make(2, 4, 2, 10, 4, 8, torch.float32)
    torch.testing.assert_close(cascade_attention(*args, 3), cascade_attention_torch(*args, 3))
    with pytest.raises(ValueError, match="not a multiple"):
        cascade_attention_torch(torch.randn(2, 3, 8), *args[1:], 3)
    with pytest.raises(ValueError, match="n=9"):
        cascade_attention_torch(*args, 9)
