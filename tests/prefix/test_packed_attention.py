"""Block-by-block attention of the packed row against SDPA over the dense block mask (float64).

Rows of different prefix lengths, suffixes of different lengths (an empty one included), padding at
the end of a row, grouped-query heads; the output and the gradients of q, k and v. Device-generic:
on the machine's device (CUDA where a GPU is visible).
"""
import pytest
import torch

from fastebm.model.packed_attention import RowLayout, packed_attention_forward

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dense_mask(P, lengths, L):
    m = torch.zeros(L, L, dtype=torch.bool, device=DEVICE)
    m[:P, :P] = torch.ones(P, P, dtype=torch.bool, device=DEVICE).tril()
    start = P
    for s in lengths:
        m[start:start + s, :P] = True
        m[start:start + s, start:start + s] = torch.ones(s, s, dtype=torch.bool, device=DEVICE).tril()
        start += s
    for i in range(start, L):  # padding sees itself only
        m[i, i] = True
    return m, start


class _Attn(torch.nn.Module):
    num_key_value_groups = 3


@pytest.mark.parametrize("rows", [
    [(7, [3, 5, 1])],                      # one row, suffixes of different lengths
    [(5, [4, 0, 2]), (9, [1, 6])],         # two rows, an empty suffix, padding in the first row
    [(1, [2, 2, 2, 2])],                   # a one-token prefix
])
def test_matches_dense_mask_forward_and_gradients(rows):
    H, Hkv, D, scale = 6, 2, 8, 0.3
    L = max(P + sum(ls) for P, ls in rows)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(len(rows), H, L, D, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    k = torch.randn(len(rows), Hkv, L, D, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    v = torch.randn(len(rows), Hkv, L, D, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    grad_out = torch.randn(len(rows), L, H, D, generator=g, dtype=torch.float64).to(DEVICE)

    masks, ends = zip(*(dense_mask(P, ls, L) for P, ls in rows))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
        attn_mask=torch.stack(masks)[:, None], scale=scale).transpose(1, 2)
    layout = [RowLayout.build(P, ls, DEVICE) for P, ls in rows]
    out, _ = packed_attention_forward(_Attn(), q, k, v, None, scaling=scale, fastebm_packed=layout)
    valid = torch.zeros(len(rows), L, dtype=torch.bool, device=DEVICE)
    for r, e in enumerate(ends):
        valid[r, :e] = True  # padding outputs are never read
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-12, rtol=1e-10)

    grads = torch.autograd.grad((out * grad_out)[valid].sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * grad_out)[valid].sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


def test_without_a_layout_it_is_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 5, 4, generator=g).to(DEVICE) for h in (6, 2, 2))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool, device=DEVICE).tril()
    mask[0, :, :, 0] = False
    mask[0, 0, 0, 0] = True
    out, _ = packed_attention_forward(_Attn(), q, k, v, mask, scaling=0.5)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.5)
    assert torch.equal(out, ref)
