"""Cascade attention for decoding G samples that share one prefix.

At decode step t every sample g has one query per head and attends to

    [ shared prefix K/V (P tokens, stored once) ; its own suffix K/V (t tokens) ]

Instead of copying the prefix K/V G times, the attention is split in two and merged by
log-sum-exp (as FlashInfer's cascade inference):

  phase 1 (prefix): all G x (heads per KV head) queries of one KV head form the query block of a
           single multi-query attention over the prefix: the prefix is read once per step.
  phase 2 (suffix): per sample, attention over its own t suffix keys, then the merge
           o = (e^{lse_p} o_p + e^{lse_s} o_s) / (e^{lse_p} + e^{lse_s}).

Shapes: q (G, Hq, D); prefix_k/v (Hkv, P, D); suffix_k/v (G, Hkv, Tmax, D) of which the first
``n`` are valid. Grouped-query attention: Hq = Hkv * groups, query head h reads KV head h // groups.
Output (G, Hq, D) in q's dtype; accumulation in fp32.

File anatomy: Triton kernels -> launch wrapper -> public function (no autograd: decoding only) ->
plain-torch ``cascade_attention_ref`` (the SDPA check) and ``cascade_attention_torch`` (the same
two-phase math in PyTorch, used on the CPU).
"""
from __future__ import annotations

import math

import torch

from ._backend import resolve_backend

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover
    _HAS_TRITON = False


if _HAS_TRITON:

    @triton.jit
    def _prefix_phase_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, M, P, D, GROUPS, scale,
                             s_qg, s_qh, s_kh, s_kp, s_oh, s_om, s_lh,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: KV head `h`, query rows [m0, m0 + BLOCK_M) of the M = G * GROUPS rows that read it.
        h = tl.program_id(0)
        m0 = tl.program_id(1) * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        row_ok = rows < M
        g = rows // GROUPS
        qh = h * GROUPS + rows % GROUPS
        q = tl.load(q_ptr + g[:, None] * s_qg + qh[:, None] * s_qh + dd[None, :],
                    mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(0, P, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < P
            kv_off = h * s_kh + cols[:, None] * s_kp + dd[None, :]
            kv_mask = col_ok[:, None] & (dd[None, :] < D)
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(o_ptr + h * s_oh + rows[:, None] * s_om + dd[None, :], o, mask=row_ok[:, None] & (dd[None, :] < D))
        tl.store(lse_ptr + h * s_lh + rows, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _suffix_merge_kernel(q_ptr, k_ptr, v_ptr, op_ptr, lsep_ptr, out_ptr, n, D, GROUPS, scale,
                             s_qg, s_qh, s_kg, s_kh, s_kt, s_oph, s_opm, s_lph, s_og, s_oh,
                             BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: sample g, KV head h; its GROUPS query heads against its own n suffix keys.
        g = tl.program_id(0)
        h = tl.program_id(1)
        gi = tl.arange(0, BLOCK_G)
        dd = tl.arange(0, BLOCK_D)
        g_ok = gi < GROUPS
        qh = h * GROUPS + gi
        q = tl.load(q_ptr + g * s_qg + qh[:, None] * s_qh + dd[None, :],
                    mask=g_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            kv_off = g * s_kg + h * s_kh + cols[:, None] * s_kt + dd[None, :]
            kv_mask = col_ok[:, None] & (dd[None, :] < D)
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        # merge with the prefix phase's (o_p, lse_p) of the same query rows
        rows = g * GROUPS + gi
        o_p = tl.load(op_ptr + h * s_oph + rows[:, None] * s_opm + dd[None, :],
                      mask=g_ok[:, None] & (dd[None, :] < D), other=0.0)
        lse_p = tl.load(lsep_ptr + h * s_lph + rows, mask=g_ok, other=0.0)
        lse_s = m_i + tl.log(l_i)  # -inf when n == 0
        mx = tl.maximum(lse_p, lse_s)
        w_p = tl.exp(lse_p - mx)
        w_s = tl.where(l_i > 0, tl.exp(lse_s - mx), 0.0)
        o_s = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o = (w_p[:, None] * o_p + w_s[:, None] * o_s) / (w_p + w_s)[:, None]
        tl.store(out_ptr + g * s_og + qh[:, None] * s_oh + dd[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & (dd[None, :] < D))


def _check(q, prefix_k, prefix_v, suffix_k, suffix_v, n):
    G, Hq, D = q.shape
    Hkv, P, Dk = prefix_k.shape
    if Dk != D or prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix k/v {tuple(prefix_k.shape)}/{tuple(prefix_v.shape)} do not match q {tuple(q.shape)}")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if suffix_k.shape[:2] != (G, Hkv) or suffix_k.shape[3] != D or suffix_v.shape != suffix_k.shape:
        raise ValueError(f"suffix k/v {tuple(suffix_k.shape)} do not match (G={G}, Hkv={Hkv}, T, D={D})")
    if not 0 <= n <= suffix_k.shape[2]:
        raise ValueError(f"n={n} suffix tokens, buffer holds {suffix_k.shape[2]}")
    return G, Hq, Hkv, P, D


def cascade_attention_triton(q, prefix_k, prefix_v, suffix_k, suffix_v, n: int, scale: float | None = None):
    """Launch the two phases (Triton: CUDA, or the CPU interpreter under TRITON_INTERPRET=1)."""
    G, Hq, Hkv, P, D = _check(q, prefix_k, prefix_v, suffix_k, suffix_v, n)
    if P == 0:
        raise ValueError("cascade attention needs a non-empty prefix")
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    groups = Hq // Hkv
    M = G * groups
    q, prefix_k, prefix_v = q.contiguous(), prefix_k.contiguous(), prefix_v.contiguous()
    suffix_k, suffix_v = suffix_k.contiguous(), suffix_v.contiguous()
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M = max(16, min(64, triton.next_power_of_2(M)))
    BLOCK_N = 64 if P >= 64 else max(16, triton.next_power_of_2(P))
    o_p = torch.empty((Hkv, M, D), device=q.device, dtype=torch.float32)
    lse_p = torch.empty((Hkv, M), device=q.device, dtype=torch.float32)
    _prefix_phase_kernel[(Hkv, triton.cdiv(M, BLOCK_M))](
        q, prefix_k, prefix_v, o_p, lse_p, M, P, D, groups, scale,
        q.stride(0), q.stride(1), prefix_k.stride(0), prefix_k.stride(1), o_p.stride(0), o_p.stride(1),
        lse_p.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    out = torch.empty_like(q)
    BLOCK_G = max(16, triton.next_power_of_2(groups))
    _suffix_merge_kernel[(G, Hkv)](
        q, suffix_k, suffix_v, o_p, lse_p, out, n, D, groups, scale,
        q.stride(0), q.stride(1), suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2),
        o_p.stride(0), o_p.stride(1), lse_p.stride(0), out.stride(0), out.stride(1),
        BLOCK_G=BLOCK_G, BLOCK_N=32, BLOCK_D=BLOCK_D)
    return out


def cascade_attention_torch(q, prefix_k, prefix_v, suffix_k, suffix_v, n: int, scale: float | None = None):
    """The same two-phase math in PyTorch: the prefix is never copied per sample."""
    G, Hq, Hkv, P, D = _check(q, prefix_k, prefix_v, suffix_k, suffix_v, n)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    groups = Hq // Hkv
    qf = q.float().view(G, Hkv, groups, D)
    # phase 1: (Hkv, G*groups, D) queries against (Hkv, P, D) keys, one matmul per KV head
    qp = qf.permute(1, 0, 2, 3).reshape(Hkv, G * groups, D)
    s_p = torch.matmul(qp, prefix_k.float().transpose(1, 2)) * scale          # (Hkv, G*groups, P)
    lse_p = torch.logsumexp(s_p, -1)                                           # (Hkv, G*groups)
    o_p = torch.matmul(torch.softmax(s_p, -1), prefix_v.float())               # (Hkv, G*groups, D)
    o_p = o_p.view(Hkv, G, groups, D).permute(1, 0, 2, 3)                      # (G, Hkv, groups, D)
    lse_p = lse_p.view(Hkv, G, groups).permute(1, 0, 2)                        # (G, Hkv, groups)
    if n == 0:
        return o_p.reshape(G, Hq, D).to(q.dtype)
    # phase 2: each sample's queries against its own n suffix keys
    ks, vs = suffix_k[:, :, :n].float(), suffix_v[:, :, :n].float()            # (G, Hkv, n, D)
    s_s = torch.matmul(qf, ks.transpose(-1, -2)) * scale                       # (G, Hkv, groups, n)
    lse_s = torch.logsumexp(s_s, -1)
    o_s = torch.matmul(torch.softmax(s_s, -1), vs)                             # (G, Hkv, groups, D)
    mx = torch.maximum(lse_p, lse_s)
    w_p, w_s = torch.exp(lse_p - mx), torch.exp(lse_s - mx)
    o = (w_p[..., None] * o_p + w_s[..., None] * o_s) / (w_p + w_s)[..., None]
    return o.reshape(G, Hq, D).to(q.dtype)


def cascade_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, n: int, scale: float | None = None,
                      backend: str = "auto"):
    """Decode-step attention over a shared prefix and per-sample suffixes (see module docstring).

    ``backend="auto"`` runs the Triton kernels on CUDA and the PyTorch two-phase path elsewhere.
    """
    if resolve_backend(backend, q.device) == "triton":
        return cascade_attention_triton(q, prefix_k, prefix_v, suffix_k, suffix_v, n, scale)
    return cascade_attention_torch(q, prefix_k, prefix_v, suffix_k, suffix_v, n, scale)


def cascade_attention_ref(q, prefix_k, prefix_v, suffix_k, suffix_v, n: int, scale: float | None = None,
                          upcast: bool = False):
    """The check: copy the prefix for every sample and run plain SDPA with GQA."""
    G, Hq, Hkv, P, D = _check(q, prefix_k, prefix_v, suffix_k, suffix_v, n)
    dt = torch.float64 if upcast else q.dtype
    k = torch.cat([prefix_k.unsqueeze(0).expand(G, -1, -1, -1), suffix_k[:, :, :n]], dim=2).to(dt)
    v = torch.cat([prefix_v.unsqueeze(0).expand(G, -1, -1, -1), suffix_v[:, :, :n]], dim=2).to(dt)
    groups = Hq // Hkv
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.to(dt).unsqueeze(2), k, v, scale=scale)
    return out.squeeze(2)
