"""Attention for the packed shared-prefix row, block by block instead of through a dense mask.

The packed row ``[prefix (P) | suffix_1 | ... | suffix_k | pad]`` (``fastebm.model.prefix``) needs
prefix tokens causal among themselves and each suffix attending to the whole prefix and causally
to itself. A dense ``L x L`` mask expresses that, but attention then computes every block of the
square — at a prefix 16x the suffix with 8 suffixes, about 2.2x the scores it needs — and on CUDA a
masked SDPA cannot use the flash kernels, and transformers repeats the K/V heads for it. Here each
row runs two plain attentions per layer:

  prefix    SDPA(q[:P], k[:P], v[:P], causal)                             — the prefix once;
  suffixes  SDPA(q_i, [k[:P]; k_i], [v[:P]; v_i], causal lower-right)     — all k suffixes of the
            row as one batch (padded to the longest; the lower-right causal mask already hides a
            shorter suffix's padding from its real queries), the prefix K/V broadcast to the batch.

Both are ``torch.nn.functional.scaled_dot_product_attention`` (GQA through ``enable_gqa``), so
autograd gives the exact gradient: the suffixes' gradients w.r.t. the prefix K/V sum into the one
prefix computation. The prefix K/V are copied once per suffix inside a layer's attention
(transient, k x P x Hkv x D), never kept per sample.

Used through transformers' attention interface: ``packed_layout(model, layout)`` switches the
text model's attention to ``"fastebm_packed"`` for one forward and gives it the row layout.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

NAME = "fastebm_packed"


@dataclass
class RowLayout:
    """One packed row: prefix length ``P``, the suffixes' lengths in order (they follow the prefix
    back to back), and index tensors built once per forward (on the model's device)."""
    P: int
    lengths: list[int]
    gather: torch.Tensor   # (k * Smax,) row positions of each suffix slot; padding slots repeat a valid one
    keep: torch.Tensor     # (n,) the slots holding real tokens, in row order (n = sum(lengths))

    @classmethod
    def build(cls, P: int, lengths: list[int], device) -> RowLayout:
        smax = max(lengths)
        gather, keep, start = [], [], P
        for i, s in enumerate(lengths):
            gather += [start + min(t, s - 1) for t in range(smax)]
            keep += [i * smax + t for t in range(s)]
            start += s
        return cls(P, list(lengths), torch.tensor(gather, dtype=torch.long, device=device),
                   torch.tensor(keep, dtype=torch.long, device=device))


_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("fastebm_packed_layout", default=None)


def _row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: RowLayout, L: int, scale, dropout: float):
    """One row: q (H, L, D), k/v (Hkv, L, D) -> (H, L, D)."""
    H, _, D = q.shape
    Hkv = k.shape[0]
    P, n, gqa = lay.P, sum(lay.lengths), H != Hkv
    parts = [F.scaled_dot_product_attention(q[None, :, :P], k[None, :, :P], v[None, :, :P], is_causal=True,
                                            scale=scale, dropout_p=dropout, enable_gqa=gqa)[0]]
    if n:
        nk, smax = len(lay.lengths), lay.gather.numel() // len(lay.lengths)

        def slots(x):  # (h, L, D) -> (k, h, Smax, D)
            return x.index_select(1, lay.gather).view(x.shape[0], nk, smax, D).transpose(0, 1)

        kc = torch.cat([k[None, :, :P].expand(nk, -1, -1, -1), slots(k)], dim=2)   # (k, Hkv, P + Smax, D)
        vc = torch.cat([v[None, :, :P].expand(nk, -1, -1, -1), slots(v)], dim=2)
        o = F.scaled_dot_product_attention(slots(q), kc, vc, attn_mask=causal_lower_right(smax, P + smax),
                                           scale=scale, dropout_p=dropout, enable_gqa=gqa)  # (k, H, Smax, D)
        parts.append(o.transpose(0, 1).reshape(H, nk * smax, D).index_select(1, lay.keep))
    if P + n < L:
        parts.append(q.new_zeros((H, L - P - n, D)))  # padding: never read
    return torch.cat(parts, dim=1)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling=None, **kwargs):
    """transformers attention interface: query (R, H, L, D), key/value (R, Hkv, L, D) ->
    ((R, L, H, D), None), rows laid out as ``packed_layout`` says."""
    layout = _LAYOUT.get()
    if layout is None:
        raise RuntimeError(f"attention '{NAME}' called outside fastebm.model.packed_attention.packed_layout")
    if len(layout) != query.shape[0]:
        raise ValueError(f"packed layout has {len(layout)} rows, the batch {query.shape[0]}")
    L = query.shape[2]
    out = torch.stack([_row(query[r], key[r], value[r], lay, L, scaling, dropout) for r, lay in enumerate(layout)])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)


@contextlib.contextmanager
def packed_layout(model, layout: list[RowLayout]):
    """For the duration: the text model's attention is ``packed_attention_forward`` over ``layout``
    (the vision tower keeps its own). No attention mask is built (transformers builds none for an
    implementation without a mask function)."""
    _register()
    cfg = model.model.language_model.config
    before = cfg._attn_implementation
    token = _LAYOUT.set(layout)
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = before
        _LAYOUT.reset(token)
