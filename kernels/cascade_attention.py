"""Cascade attention for decoding G samples per prompt that share the prompt's prefix.

At decode step t every sample (row) r of prompt b = r // G has one query per head and attends to

    [ prompt b's prefix K/V (P_b tokens, stored once) ; its own suffix K/V (n tokens) ]

Instead of copying a prefix's K/V for each of its G samples, the attention is split in two and
merged by log-sum-exp (as FlashInfer's cascade inference):

  phase 1 (prefix): the G x (heads per KV head) queries of a prompt and KV head form the query
           block of one multi-query attention over that prompt's prefix: each prefix is read once
           per step, whatever G is;
  phase 2 (suffix): per sample, attention over its own n suffix keys, then the merge
           o = (e^{lse_p} o_p + e^{lse_s} o_s) / (e^{lse_p} + e^{lse_s}).

Shapes: q (B*G, Hq, D), rows grouped by prompt; prefix_k/v (B, Hkv, Pmax, D) with the valid
lengths ``prefix_len`` (B,) (prompts of different lengths, padded once — never per sample);
suffix_k/v (B*G, Hkv, Tmax, D) of which the first ``n`` are valid. Grouped-query attention:
Hq = Hkv * groups, query head h reads KV head h // groups. Output (B*G, Hq, D) in q's dtype;
accumulation in fp32.

File anatomy: Triton kernels -> launch wrapper -> public function (no autograd: decoding only) ->
plain-torch ``cascade_attention_ref`` (SDPA over copied prefixes, the check) and
``cascade_attention_torch`` (the same no-copy math in PyTorch, used on the CPU).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from ._backend import device_arch, launch, resolve_backend

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover
    _HAS_TRITON = False


if _HAS_TRITON:

    @triton.jit
    def _online_softmax_step(q, k, v, col_ok, m_i, l_i, acc, scale):
        """One key block of flash attention: running max m_i, normaliser l_i, unnormalised acc."""
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p, v)

    @triton.jit
    def _prefix_phase_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, lse_ptr, G, HKV, M, D, GROUPS, scale,
                             s_qr, s_qh, s_kb, s_kh, s_kp, s_ob, s_om, s_lb,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: prompt b, KV head h, query rows [m0, m0 + BLOCK_M) of its M = G * GROUPS rows.
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        m0 = tl.program_id(1) * BLOCK_M
        P = tl.load(len_ptr + b)
        rows = m0 + tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        row_ok = rows < M
        r = b * G + rows // GROUPS                 # the sample (q row) of each query row
        qh = h * GROUPS + rows % GROUPS
        q = tl.load(q_ptr + r[:, None] * s_qr + qh[:, None] * s_qh + dd[None, :],
                    mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(0, P, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < P
            kv_off = b * s_kb + h * s_kh + cols[:, None] * s_kp + dd[None, :]
            kv_mask = col_ok[:, None] & (dd[None, :] < D)
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            m_i, l_i, acc = _online_softmax_step(q, k, v, col_ok, m_i, l_i, acc, scale)
        o = acc / l_i[:, None]
        tl.store(o_ptr + bh * s_ob + rows[:, None] * s_om + dd[None, :], o, mask=row_ok[:, None] & (dd[None, :] < D))
        tl.store(lse_ptr + bh * s_lb + rows, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _suffix_merge_kernel(q_ptr, k_ptr, v_ptr, op_ptr, lsep_ptr, out_ptr, n, G, HKV, D, GROUPS, scale,
                             s_qr, s_qh, s_kr, s_kh, s_kt, s_opb, s_opm, s_lpb, s_or, s_oh,
                             BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: sample r, KV head h; its GROUPS query heads against its own n suffix keys.
        r = tl.program_id(0)
        h = tl.program_id(1)
        b = r // G
        g = r % G
        gi = tl.arange(0, BLOCK_G)
        dd = tl.arange(0, BLOCK_D)
        g_ok = gi < GROUPS
        qh = h * GROUPS + gi
        q = tl.load(q_ptr + r * s_qr + qh[:, None] * s_qh + dd[None, :],
                    mask=g_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            kv_off = r * s_kr + h * s_kh + cols[:, None] * s_kt + dd[None, :]
            kv_mask = col_ok[:, None] & (dd[None, :] < D)
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            m_i, l_i, acc = _online_softmax_step(q, k, v, col_ok, m_i, l_i, acc, scale)
        # merge with the prefix phase's (o_p, lse_p) of the same query rows
        rows = g * GROUPS + gi
        bh = b * HKV + h
        o_p = tl.load(op_ptr + bh * s_opb + rows[:, None] * s_opm + dd[None, :],
                      mask=g_ok[:, None] & (dd[None, :] < D), other=0.0)
        lse_p = tl.load(lsep_ptr + bh * s_lpb + rows, mask=g_ok, other=0.0)
        lse_s = m_i + tl.log(l_i)  # -inf when n == 0
        mx = tl.maximum(lse_p, lse_s)
        w_p = tl.exp(lse_p - mx)
        w_s = tl.where(l_i > 0, tl.exp(lse_s - mx), 0.0)
        o_s = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o = (w_p[:, None] * o_p + w_s[:, None] * o_s) / (w_p + w_s)[:, None]
        tl.store(out_ptr + r * s_or + qh[:, None] * s_oh + dd[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & (dd[None, :] < D))


Lengths = Union[Sequence[int], torch.Tensor]

# Prefix phase launch options per architecture (largest key block, warps, pipeline stages), chosen so
# that the compile gate (fastebm doctor --compile) is green at head dim 128 for bf16 / fp16 / fp32:
# no spills, shared memory within sm_86's 99 KiB ("sm80") and sm_90's 227 KiB. Not tuned on hardware.
PREFIX_TILES = {"sm80": dict(block_n=32, num_warps=4, num_stages=2),
                "sm90": dict(block_n=64, num_warps=8, num_stages=2),
                "interpret": dict(block_n=64, num_warps=4, num_stages=1)}


def _check(q, prefix_k, prefix_v, prefix_len, suffix_k, suffix_v, n):
    R, Hq, D = q.shape
    B, Hkv, Pmax, Dk = prefix_k.shape
    if Dk != D or prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix k/v {tuple(prefix_k.shape)}/{tuple(prefix_v.shape)} do not match q {tuple(q.shape)}")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if R % B:
        raise ValueError(f"{R} query rows do not split into {B} prompts")
    if suffix_k.shape[:2] != (R, Hkv) or suffix_k.shape[3] != D or suffix_v.shape != suffix_k.shape:
        raise ValueError(f"suffix k/v {tuple(suffix_k.shape)} do not match (rows={R}, Hkv={Hkv}, T, D={D})")
    if not 0 <= n <= suffix_k.shape[2]:
        raise ValueError(f"n={n} suffix tokens, buffer holds {suffix_k.shape[2]}")
    lens = [int(x) for x in prefix_len]
    if len(lens) != B or not all(1 <= x <= Pmax for x in lens):
        raise ValueError(f"prefix_len {lens}: expected {B} lengths in [1, {Pmax}]")
    return R, Hq, B, Hkv, Pmax, D, lens


def cascade_attention_triton(q, prefix_k, prefix_v, prefix_len: Lengths, suffix_k, suffix_v, n: int,
                             scale: float | None = None):
    """Launch the two phases (Triton: CUDA, or the CPU interpreter under TRITON_INTERPRET=1)."""
    R, Hq, B, Hkv, Pmax, D, lens = _check(q, prefix_k, prefix_v, prefix_len, suffix_k, suffix_v, n)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    groups, G = Hq // Hkv, R // B
    M = G * groups
    q, prefix_k, prefix_v = q.contiguous(), prefix_k.contiguous(), prefix_v.contiguous()
    suffix_k, suffix_v = suffix_k.contiguous(), suffix_v.contiguous()
    lens_t = torch.tensor(lens, dtype=torch.int32, device=q.device)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M = max(16, min(64, triton.next_power_of_2(M)))
    t = PREFIX_TILES[device_arch(q.device)]
    BLOCK_N = t["block_n"] if Pmax >= t["block_n"] else max(16, triton.next_power_of_2(Pmax))
    o_p = torch.empty((B * Hkv, M, D), device=q.device, dtype=torch.float32)
    lse_p = torch.empty((B * Hkv, M), device=q.device, dtype=torch.float32)
    launch(_prefix_phase_kernel, (B * Hkv, triton.cdiv(M, BLOCK_M)),
        q, prefix_k, prefix_v, lens_t, o_p, lse_p, G, Hkv, M, D, groups, scale,
        q.stride(0), q.stride(1), prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        o_p.stride(0), o_p.stride(1), lse_p.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=t["num_warps"], num_stages=t["num_stages"])
    out = torch.empty_like(q)
    BLOCK_G = max(16, triton.next_power_of_2(groups))
    launch(_suffix_merge_kernel, (R, Hkv),
        q, suffix_k, suffix_v, o_p, lse_p, out, n, G, Hkv, D, groups, scale,
        q.stride(0), q.stride(1), suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2),
        o_p.stride(0), o_p.stride(1), lse_p.stride(0), out.stride(0), out.stride(1),
        BLOCK_G=BLOCK_G, BLOCK_N=32, BLOCK_D=BLOCK_D)
    return out


def cascade_attention_torch(q, prefix_k, prefix_v, prefix_len: Lengths, suffix_k, suffix_v, n: int,
                            scale: float | None = None):
    """The same math in PyTorch, without copying any prefix per sample: one softmax over the
    concatenated [prefix scores ; suffix scores] (equal to the log-sum-exp merge of the two phases)."""
    R, Hq, B, Hkv, Pmax, D, lens = _check(q, prefix_k, prefix_v, prefix_len, suffix_k, suffix_v, n)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    groups, G = Hq // Hkv, R // B
    qf = q.float()
    # phase 1 scores: per prompt and KV head, its G*groups queries against its prefix
    qp = qf.view(B, G, Hkv, groups, D).transpose(1, 2).reshape(B, Hkv, G * groups, D)
    s_p = torch.matmul(qp, prefix_k.float().transpose(-1, -2)) * scale        # (B, Hkv, G*groups, Pmax)
    if min(lens) < Pmax:
        pad = torch.arange(Pmax, device=q.device)[None, :] >= torch.tensor(lens, device=q.device)[:, None]
        s_p = s_p.masked_fill(pad[:, None, None, :], float("-inf"))
    s_p = s_p.view(B, Hkv, G, groups, Pmax).transpose(1, 2).reshape(R, Hkv, groups, Pmax)
    # phase 2 scores: each sample's queries against its own n suffix keys
    s_s = torch.matmul(qf.view(R, Hkv, groups, D), suffix_k[:, :, :n].float().transpose(-1, -2)) * scale
    p = torch.softmax(torch.cat([s_p, s_s], dim=-1), dim=-1)                   # (R, Hkv, groups, Pmax + n)
    p_p = p[..., :Pmax].reshape(B, G, Hkv, groups, Pmax).transpose(1, 2).reshape(B, Hkv, G * groups, Pmax)
    o = torch.matmul(p_p, prefix_v.float())                                    # (B, Hkv, G*groups, D)
    o = o.view(B, Hkv, G, groups, D).transpose(1, 2).reshape(R, Hkv, groups, D)
    if n:
        o = o + torch.matmul(p[..., Pmax:], suffix_v[:, :, :n].float())
    return o.reshape(R, Hq, D).to(q.dtype)


def cascade_attention(q, prefix_k, prefix_v, prefix_len: Lengths, suffix_k, suffix_v, n: int,
                      scale: float | None = None, backend: str = "auto"):
    """Decode-step attention over per-prompt shared prefixes and per-sample suffixes (module docstring).

    ``backend="auto"`` runs the Triton kernels on CUDA and the PyTorch path elsewhere.
    """
    if resolve_backend(backend, q.device) == "triton":
        return cascade_attention_triton(q, prefix_k, prefix_v, prefix_len, suffix_k, suffix_v, n, scale)
    return cascade_attention_torch(q, prefix_k, prefix_v, prefix_len, suffix_k, suffix_v, n, scale)


def cascade_attention_ref(q, prefix_k, prefix_v, prefix_len: Lengths, suffix_k, suffix_v, n: int,
                          scale: float | None = None, upcast: bool = False):
    """The check: copy each prompt's prefix for every one of its samples and run plain SDPA (GQA)."""
    R, Hq, B, Hkv, Pmax, D, lens = _check(q, prefix_k, prefix_v, prefix_len, suffix_k, suffix_v, n)
    dt = torch.float64 if upcast else q.dtype
    G, groups = R // B, Hq // Hkv
    outs = []
    for r in range(R):
        b = r // G
        k = torch.cat([prefix_k[b, :, :lens[b]], suffix_k[r, :, :n]], dim=1).to(dt)   # (Hkv, P_b + n, D)
        v = torch.cat([prefix_v[b, :, :lens[b]], suffix_v[r, :, :n]], dim=1).to(dt)
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        o = torch.nn.functional.scaled_dot_product_attention(q[r].to(dt)[:, None], k, v, scale=scale)
        outs.append(o[:, 0])
    return torch.stack(outs)
