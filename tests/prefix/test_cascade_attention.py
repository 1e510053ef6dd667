"""Cascade attention (per-prompt shared prefixes + per-sample suffixes, merged by log-sum-exp)
against SDPA over copied prefixes.

Device-generic: on a CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), on a
GPU natively on CUDA tensors (bf16 without widening). Shapes are small and odd:
prefixes of different lengths in one call, lengths not a multiple of the block, grouped-query
heads, n = 0 suffix tokens, head dim not a power of two.
"""
import pytest
import torch

from fastebm.kernels.cascade_attention import (cascade_attention, cascade_attention_ref,
                                               cascade_attention_torch, cascade_attention_triton)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make(B, G, Hq, Hkv, lens, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    P = max(lens)
    return r(B * G, Hq, D), r(B, Hkv, P, D), r(B, Hkv, P, D), list(lens), r(B * G, Hkv, T, D), r(B * G, Hkv, T, D)


SHAPES = [  # B, G, Hq, Hkv, prefix lengths, T, n, D
    (1, 4, 4, 2, [37], 8, 5, 16),
    (2, 3, 6, 2, [70, 41], 6, 0, 24),   # no suffix yet (first decode step), D not a power of 2
    (3, 8, 2, 2, [16, 9, 16], 4, 4, 32),  # MHA, full buffer
    (2, 1, 8, 1, [129, 64], 3, 1, 8),   # MQA, a prefix just over two blocks
]


@pytest.mark.filterwarnings("ignore:divide by zero")  # log(0) = -inf for n = 0, by design
@pytest.mark.parametrize("B,G,Hq,Hkv,lens,T,n,D", SHAPES)
@pytest.mark.parametrize("impl", [cascade_attention_torch, cascade_attention_triton], ids=["torch", "triton"])
def test_fp32_matches_sdpa(impl, B, G, Hq, Hkv, lens, T, n, D):
    args = make(B, G, Hq, Hkv, lens, T, D, torch.float32)
    ref = cascade_attention_ref(*args, n, upcast=True)
    out = impl(*args, n)
    assert out.shape == (B * G, Hq, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [cascade_attention_torch, cascade_attention_triton], ids=["torch", "triton"])
def test_bf16_three_way_rule(impl):
    """Error vs the fp64 reference at most 2x PyTorch's own bf16 SDPA error, plus a small atol."""
    args = make(2, 4, 4, 2, [45, 30], 7, 32, torch.bfloat16, seed=3)
    ref = cascade_attention_ref(*args, 6, upcast=True)
    torch_bf16 = cascade_attention_ref(*args, 6)
    out = impl(*args, 6)
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs().max().item()
    base = (torch_bf16.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3, (err, base)


def test_padding_of_a_shorter_prefix_is_never_attended():
    """Garbage in the padded part of a shorter prefix must not change its samples' outputs."""
    q, pk, pv, lens, sk, sv = make(2, 3, 4, 2, [20, 11], 5, 16, torch.float32)
    a = cascade_attention_torch(q, pk, pv, lens, sk, sv, 4)
    pk2, pv2 = pk.clone(), pv.clone()
    pk2[1, :, 11:] = 1e4
    pv2[1, :, 11:] = -1e4
    torch.testing.assert_close(cascade_attention_torch(q, pk2, pv2, lens, sk, sv, 4), a)


def test_public_dispatch_and_shape_errors():
    args = make(2, 2, 4, 2, [10, 7], 4, 8, torch.float32)
    torch.testing.assert_close(cascade_attention(*args, 3), cascade_attention_torch(*args, 3))
    q, pk, pv, lens, sk, sv = args
    with pytest.raises(ValueError, match="not a multiple"):
        cascade_attention_torch(torch.randn(4, 3, 8, device=DEVICE), pk, pv, lens, sk, sv, 3)
    with pytest.raises(ValueError, match="n=9"):
        cascade_attention_torch(*args, 9)
    with pytest.raises(ValueError, match="prefix_len"):
        cascade_attention_torch(q, pk, pv, [10, 11], sk, sv, 3)
