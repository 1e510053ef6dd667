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

Used through transformers' attention interface. ``enable(model)`` makes the text model's
attention ``"fastebm_sdpa"`` (once, in place): transformers' own SDPA attention and SDPA mask for
every forward, except one that carries a packed layout in its keyword arguments
(``model.model(..., fastebm_packed=[RowLayout, ...])``, which transformers hands down to every
attention call). Because the layout travels with the forward's arguments, a layer that gradient
checkpointing runs again inside backward sees it again — a switch set around the forward would be
gone by then. Models whose text attention is not SDPA (eager, flash-attn) are left alone; the
packed row then runs their attention over the dense block mask.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

NAME = "fastebm_sdpa"


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
                             scaling=None, fastebm_packed=None, **kwargs):
    """transformers attention interface ``"fastebm_sdpa"``: query (R, H, L, D), key/value (R, Hkv, L, D)
    -> ((R, L, H, D), None). Without ``fastebm_packed`` it is transformers' SDPA attention; with it
    (one ``RowLayout`` per row) the packed rows block by block."""
    if fastebm_packed is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if len(fastebm_packed) != query.shape[0]:
        raise ValueError(f"packed layout has {len(fastebm_packed)} rows, the batch {query.shape[0]}")
    L = query.shape[2]
    out = torch.stack([_row(query[r], key[r], value[r], lay, L, scaling, dropout)
                       for r, lay in enumerate(fastebm_packed)])
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    """``NAME`` in transformers' attention and mask interfaces (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def enable(model) -> bool:
    """Route the text model's attention through ``packed_attention_forward`` (in place, once).

    True when the packed rows of ``model`` can run block by block: its text attention was SDPA (now
    ``"fastebm_sdpa"``, which is SDPA for every other forward). False for other attention
    implementations, which are left as they are.
    """
    _register()
    cfg = model.model.language_model.config
    if cfg._attn_implementation == "sdpa":
        cfg._attn_implementation = NAME
    return cfg._attn_implementation == NAME
