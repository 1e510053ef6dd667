"""Selected-token log-probabilities straight from hidden states and the lm_head weight.

    logp[n] = log softmax((hidden[n] @ weight.T + bias) / temperature)[token_ids[n]]      fp32, (N,)

without ever storing the (N, V) logits: the heavy part of every GRPO pass (policy with grad, old,
reference and PCG-teacher without). This file holds the two Triton kernels, their launch wrappers,
the memory-bounded PyTorch path used on machines without CUDA, the autograd Function both share,
the public ``token_logprobs`` and its plain-torch reference.

Forward kernel (grid: row tiles x vocabulary splits): each program walks its share of the
vocabulary in BLOCK_V tiles, computes the (BLOCK_M, BLOCK_V) logit tile with a K-loop of
``tl.dot`` over the hidden size, and folds it into an online log-sum-exp (running max ``m``, running
sum ``l``), the selected token's logit and, for scoring passes, the running sum of ``p * z`` the
entropy needs. Logit tiles live in registers only. The per-split partials (SPLITS, N) are merged
in a few O(N) torch ops (more splits = more programs in flight when N is small).

Backward kernel (grid: row tiles x vocabulary tiles; Cut-Cross-Entropy style): every program
recomputes its logit tile once, turns it into d logits = g * (onehot - softmax) / temperature, with
g = dL/dlogp the per-token upstream scalar, and adds ``dz @ W_tile`` into d hidden and
``dz.T @ X_tile`` into d weight with fp32 atomics. Row tiles whose g is all zero (masked tokens)
are skipped. Vocabulary sizes that are not a multiple of BLOCK_V are masked in both kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._backend import resolve_backend, triton_interpreted

# --------------------------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Triton 3.8's interpreter returns garbage for bf16 x bf16 tl.dot; widening the operands to
    # fp32 is exact (a bf16 product fits in fp32), so the interpreted kernel computes what the GPU's
    # bf16 tensor-core dot with fp32 accumulation does, up to summation order. Never set on a GPU.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logit_tile(X, W, BIAS, rows64, row_ok, cols, cols64, col_ok, H, stride_xn, stride_wv,
                HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_V) fp32 tile of hidden @ weight.T (+ bias), accumulated over H in registers:
    computed in the forward and recomputed, identically, in the backward."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        x = tl.load(X + rows64[:, None] * stride_xn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + cols64[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(x, tl.trans(w), acc, UPCAST_DOT, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _linear_logprob_fwd_kernel(
    X, W, BIAS, IDS,                      # (N, H), (V, H), (V,) or dummy, (N,)
    M_OUT, L_OUT, SEL_OUT, T_OUT,         # partials, each (SPLITS, N) fp32
    N, V, H, stride_xn, stride_wv, inv_t, tiles_per_split,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ids = tl.load(IDS + rows, mask=row_ok, other=-1)
    rows64 = rows.to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    sel = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    for vt in range(0, tiles_per_split):
        cols = v_begin + vt * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        acc = _logit_tile(X, W, BIAS, rows64, row_ok, cols, cols64, col_ok, H, stride_xn, stride_wv,
                          HAS_BIAS, UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))  # (BLOCK_M, BLOCK_V) in registers
        # The first tile of every split holds a valid column, so m_new is finite from here on.
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, 1)
        if WITH_ENTROPY:
            t_i = t_i * alpha + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), 1)
        sel += tl.sum(tl.where(cols[None, :] == ids[:, None], z, 0.0), 1)
        m_i = m_new

    out = pid_s * N + rows
    tl.store(M_OUT + out, m_i, mask=row_ok)
    tl.store(L_OUT + out, l_i, mask=row_ok)
    tl.store(SEL_OUT + out, sel, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(T_OUT + out, t_i, mask=row_ok)


@triton.jit
def _linear_logprob_bwd_kernel(
    X, W, BIAS, IDS, LSE, G,              # (N, H), (V, H), (V,), (N,), (N,) fp32, (N,) fp32
    DX, DW, DB,                           # fp32 accumulators: (N, H), (V, H), (V,)
    N, V, H, stride_xn, stride_wv, inv_t,
    HAS_BIAS: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    # Masked tokens carry g == 0: a tile of them contributes nothing, skip the recompute.
    if tl.max(tl.abs(g), 0) > 0.0:
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        ids = tl.load(IDS + rows, mask=row_ok, other=-1)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)

        acc = _logit_tile(X, W, BIAS, rows64, row_ok, cols, cols64, col_ok, H, stride_xn, stride_wv,
                          HAS_BIAS, UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        p = tl.exp(acc * inv_t - lse[:, None])
        onehot = tl.where(cols[None, :] == ids[:, None], 1.0, 0.0)
        # d loss / d (x . w): the temperature's 1/T and the upstream per-token scalar folded in.
        dz = (onehot - p) * (g * inv_t)[:, None]
        dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
        if COMPUTE_DB:
            tl.atomic_add(DB + cols, tl.sum(dz, 0), mask=col_ok)
        dz_c = dz.to(X.dtype.element_ty)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            w = tl.load(W + cols64[:, None] * stride_wv + ks[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            dx = _dot(dz_c, w.to(dz_c.dtype), None, UPCAST_DOT, DOT_PRECISION)       # (BLOCK_M, BLOCK_K)
            tl.atomic_add(DX + rows64[:, None] * H + ks[None, :], dx,
                          mask=row_ok[:, None] & k_ok[None, :])
            if COMPUTE_DW:
                x = tl.load(X + rows64[:, None] * stride_xn + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                dw = _dot(tl.trans(dz_c), x.to(dz_c.dtype), None, UPCAST_DOT, DOT_PRECISION)  # (BLOCK_V, BLOCK_K)
                tl.atomic_add(DW + cols64[:, None] * H + ks[None, :], dw,
                              mask=col_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------------------------- #
# Launch wrappers (shape checks, allocation, grid; no autograd)
# --------------------------------------------------------------------------------------------- #

# Tile sizes. The GPU values are sensible starting points, not tuned on hardware (no GPU was
# available when this was written, see docs/kernels.md). Under the interpreter smaller tiles keep
# the numpy work per program small. Tests monkeypatch these to cross tile boundaries.
TILES_GPU = dict(fwd_m=64, fwd_v=128, fwd_k=64, bwd_m=64, bwd_v=128, bwd_k=64, num_warps=8, num_stages=3)
TILES_INTERPRET = dict(fwd_m=16, fwd_v=64, fwd_k=32, bwd_m=16, bwd_v=64, bwd_k=32, num_warps=4, num_stages=1)
MAX_SPLITS = 64


def _tiles() -> dict:
    return TILES_INTERPRET if triton_interpreted() else TILES_GPU


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check(hidden2d, weight, ids, bias):
    if hidden2d.ndim != 2 or weight.ndim != 2 or hidden2d.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H) and weight (V, H) expected, got {tuple(hidden2d.shape)} "
                         f"and {tuple(weight.shape)}")
    if ids.shape != hidden2d.shape[:1]:
        raise ValueError(f"token ids {tuple(ids.shape)} do not match hidden {tuple(hidden2d.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")


def linear_logprob_fwd_triton(hidden2d, weight, ids, bias=None, temperature=1.0, with_entropy=False,
                              num_splits: Optional[int] = None):
    """(logp (N,), lse (N,), entropy (N,) or None), all fp32, of (hidden2d @ weight.T + bias) / T."""
    _check(hidden2d, weight, ids, bias)
    hidden2d = hidden2d if hidden2d.stride(1) == 1 else hidden2d.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    ids = ids.contiguous()
    N, H = hidden2d.shape
    V = weight.shape[0]
    t = _tiles()
    n_m = triton.cdiv(N, t["fwd_m"])
    v_tiles = triton.cdiv(V, t["fwd_v"])
    if num_splits is None:  # enough programs to fill the GPU when N is small
        num_splits = max(1, min(MAX_SPLITS, (264 + n_m - 1) // n_m)) if not triton_interpreted() else 2
    tiles_per_split = triton.cdiv(v_tiles, min(num_splits, v_tiles))
    splits = triton.cdiv(v_tiles, tiles_per_split)  # every split starts on a valid column
    part = torch.empty((4, splits, N), device=hidden2d.device, dtype=torch.float32)
    if N:
        _linear_logprob_fwd_kernel[(n_m, splits)](
            hidden2d, weight, bias if bias is not None else hidden2d, ids,
            part[0], part[1], part[2], part[3],
            N, V, H, hidden2d.stride(0), weight.stride(0), 1.0 / temperature, tiles_per_split,
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
            DOT_PRECISION=_dot_precision(hidden2d.dtype), UPCAST_DOT=triton_interpreted(),
            BLOCK_M=t["fwd_m"], BLOCK_V=t["fwd_v"], BLOCK_K=t["fwd_k"],
            num_warps=t["num_warps"], num_stages=t["num_stages"],
        )
    m, l, sel, tz = part
    m_all = m.amax(0)                                  # (N,)
    scale = torch.exp(m - m_all)                       # (SPLITS, N)
    l_all = (l * scale).sum(0)
    lse = m_all + torch.log(l_all)
    logp = sel.sum(0) - lse
    entropy = lse - (tz * scale).sum(0) / l_all if with_entropy else None
    return logp, lse, entropy


def linear_logprob_bwd_triton(hidden2d, weight, ids, bias, lse, grad_logp, temperature=1.0,
                              compute_dw=True, compute_db=True):
    """fp32 (d hidden2d, d weight or None, d bias or None) for upstream dL/dlogp ``grad_logp``."""
    hidden2d = hidden2d if hidden2d.stride(1) == 1 else hidden2d.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    N, H = hidden2d.shape
    V = weight.shape[0]
    t = _tiles()
    dx = torch.zeros((N, H), device=hidden2d.device, dtype=torch.float32)
    dw = torch.zeros((V, H), device=weight.device, dtype=torch.float32) if compute_dw else None
    compute_db = compute_db and bias is not None
    db = torch.zeros((V,), device=weight.device, dtype=torch.float32) if compute_db else None
    if N:
        grid = (triton.cdiv(N, t["bwd_m"]), triton.cdiv(V, t["bwd_v"]))
        _linear_logprob_bwd_kernel[grid](
            hidden2d, weight, bias if bias is not None else hidden2d, ids.contiguous(),
            lse.contiguous(), grad_logp.float().contiguous(),
            dx, dw if dw is not None else dx, db if db is not None else dx,
            N, V, H, hidden2d.stride(0), weight.stride(0), 1.0 / temperature,
            HAS_BIAS=bias is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            DOT_PRECISION=_dot_precision(hidden2d.dtype), UPCAST_DOT=triton_interpreted(),
            BLOCK_M=t["bwd_m"], BLOCK_V=t["bwd_v"], BLOCK_K=t["bwd_k"],
            num_warps=t["num_warps"], num_stages=t["num_stages"],
        )
    return dx, dw, db


# --------------------------------------------------------------------------------------------- #
# Memory-bounded PyTorch path (machines without CUDA)
# --------------------------------------------------------------------------------------------- #

# Largest logit block held at once, in elements (4 Mi fp32 = 16 MiB); a handful of such temporaries
# exist at a time. Chunks run over tokens AND vocabulary, so memory does not grow with either.
CHUNK_ELEMS = 4 * 1024 * 1024
CHUNK_TOKENS = 1024


def _chunks(N: int, V: int):
    tok = max(1, min(N, CHUNK_TOKENS))
    voc = max(1, min(V, CHUNK_ELEMS // tok))
    return tok, voc


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16/fp16/fp32 -> fp32, fp64 stays


def linear_logprob_fwd_torch(hidden2d, weight, ids, bias=None, temperature=1.0, with_entropy=False):
    """Same contract as ``linear_logprob_fwd_triton``: chunked, online log-sum-exp, no full logits."""
    _check(hidden2d, weight, ids, bias)
    N, _ = hidden2d.shape
    V = weight.shape[0]
    cd = _compute_dtype(hidden2d)
    inv_t = 1.0 / temperature
    logp = torch.empty(N, device=hidden2d.device, dtype=cd)
    lse = torch.empty(N, device=hidden2d.device, dtype=cd)
    entropy = torch.empty(N, device=hidden2d.device, dtype=cd) if with_entropy else None
    tok, voc = _chunks(N, V)
    with torch.no_grad():
        for s in range(0, N, tok):
            x = hidden2d[s:s + tok].to(cd)                                  # (n, H)
            n = x.shape[0]
            m = torch.full((n,), float("-inf"), device=x.device, dtype=cd)
            l = torch.zeros(n, device=x.device, dtype=cd)
            tz = torch.zeros(n, device=x.device, dtype=cd) if with_entropy else None
            for v0 in range(0, V, voc):
                z = x @ weight[v0:v0 + voc].to(cd).t()                      # (n, voc)
                if bias is not None:
                    z += bias[v0:v0 + voc].to(cd)
                z *= inv_t
                m_new = torch.maximum(m, z.amax(1))
                alpha = torch.exp(m - m_new)
                if with_entropy:
                    e = torch.exp(z - m_new[:, None])
                    tz.mul_(alpha).add_((e * z).sum(1))
                else:
                    e = z.sub_(m_new[:, None]).exp_()                       # in place: z is done
                l.mul_(alpha).add_(e.sum(1))
                m = m_new
            lse_c = m + torch.log(l)
            # The selected logit directly: one H-long dot per token, no gather over the vocabulary.
            sel_w = weight[ids[s:s + tok]].to(cd)                           # (n, H)
            sel = (x * sel_w).sum(1)
            if bias is not None:
                sel += bias[ids[s:s + tok]].to(cd)
            logp[s:s + tok] = sel * inv_t - lse_c
            lse[s:s + tok] = lse_c
            if with_entropy:
                entropy[s:s + tok] = lse_c - tz / l
    return logp, lse, entropy


def linear_logprob_bwd_torch(hidden2d, weight, ids, bias, lse, grad_logp, temperature=1.0,
                             compute_dw=True, compute_db=True):
    """Same contract as ``linear_logprob_bwd_triton``: recomputes logit chunks, fp32 accumulation."""
    N, H = hidden2d.shape
    V = weight.shape[0]
    cd = _compute_dtype(hidden2d)
    inv_t = 1.0 / temperature
    dx = torch.zeros((N, H), device=hidden2d.device, dtype=cd)
    dw = torch.zeros((V, H), device=weight.device, dtype=cd) if compute_dw else None
    compute_db = compute_db and bias is not None
    db = torch.zeros((V,), device=weight.device, dtype=cd) if compute_db else None
    g_all = grad_logp.to(cd) * inv_t
    tok, voc = _chunks(N, V)
    with torch.no_grad():
        for s in range(0, N, tok):
            g = g_all[s:s + tok]
            if not bool(g.any()):        # a chunk of masked tokens: nothing to add (host sync, CPU only)
                continue
            x = hidden2d[s:s + tok].to(cd)
            n = x.shape[0]
            ids_c = ids[s:s + tok]
            lse_c = lse[s:s + tok].to(cd)
            rows = torch.arange(n, device=x.device)
            for v0 in range(0, V, voc):
                wc = weight[v0:v0 + voc].to(cd)
                dz = x @ wc.t()                                              # (n, voc) logits chunk
                if bias is not None:
                    dz += bias[v0:v0 + voc].to(cd)
                dz.mul_(inv_t).sub_(lse_c[:, None]).exp_().mul_(-g[:, None])  # -g * softmax
                hit = (ids_c >= v0) & (ids_c < v0 + wc.shape[0])
                if bool(hit.any()):
                    dz[rows[hit], ids_c[hit] - v0] += g[hit]                # + g * onehot
                dx[s:s + tok].addmm_(dz, wc)
                if dw is not None:
                    dw[v0:v0 + voc].addmm_(dz.t(), x)
                if db is not None:
                    db[v0:v0 + voc] += dz.sum(0)
    return dx, dw, db


# --------------------------------------------------------------------------------------------- #
# Autograd Function and public function
# --------------------------------------------------------------------------------------------- #


class LinearLogprobFunction(torch.autograd.Function):
    """logp (N,) fp32 of hidden2d @ weight.T (+ bias) / T; saves only inputs and lse (N,).

    ``with_entropy``: also the per-token entropy (N,), from the same forward pass (the kernels'
    running sum of p * z), as a second output that carries no gradient (top_entropy_quantile's mask
    and the entropy metric need its value only)."""

    @staticmethod
    def forward(ctx, hidden2d, weight, ids, bias, temperature, backend, with_entropy=False):
        fwd = linear_logprob_fwd_triton if backend == "triton" else linear_logprob_fwd_torch
        logp, lse, entropy = fwd(hidden2d, weight, ids, bias, temperature, with_entropy)
        ctx.save_for_backward(hidden2d, weight, ids, bias, lse)
        ctx.temperature, ctx.backend = temperature, backend
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, *_grad_entropy):  # the entropy output has no gradient
        hidden2d, weight, ids, bias, lse = ctx.saved_tensors
        bwd = linear_logprob_bwd_triton if ctx.backend == "triton" else linear_logprob_bwd_torch
        dx, dw, db = bwd(hidden2d, weight, ids, bias, lse, grad_logp, ctx.temperature,
                         compute_dw=ctx.needs_input_grad[1], compute_db=ctx.needs_input_grad[3])
        return (dx.to(hidden2d.dtype) if ctx.needs_input_grad[0] else None,
                dw.to(weight.dtype) if dw is not None else None,
                None,
                db.to(bias.dtype) if db is not None else None,
                None, None, None)


def linear_logprobs(hidden, weight, token_ids, temperature: float = 1.0, bias=None,
                    backend: str = "auto", return_entropy: bool = False):
    """Differentiable log-probs (..., ) fp32 for hidden (..., H); used by the GRPO losses.

    ``return_entropy``: ``(logp, entropy)``, the entropy (..., ) from the same forward pass, without
    gradient."""
    lead = hidden.shape[:-1]
    b = resolve_backend(backend, hidden.device)
    out = LinearLogprobFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                      token_ids.reshape(-1), bias, float(temperature), b, bool(return_entropy))
    if return_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)


@torch.no_grad()
def token_logprobs(hidden, weight, token_ids, temperature: float = 1.0, return_entropy: bool = False,
                   bias=None, backend: str = "auto"):
    """No-grad scoring pass: fp32 log-probs (B, T) of ``token_ids`` (and entropies (B, T)).

    The old, reference and PCG-teacher passes use this; logits are never materialised.
    """
    lead = hidden.shape[:-1]
    b = resolve_backend(backend, hidden.device)
    fwd = linear_logprob_fwd_triton if b == "triton" else linear_logprob_fwd_torch
    logp, _, ent = fwd(hidden.reshape(-1, hidden.shape[-1]), weight, token_ids.reshape(-1), bias,
                       float(temperature), return_entropy)
    logp = logp.view(lead)
    return (logp, ent.view(lead)) if return_entropy else logp


def eager_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor,
                   temperature: float = 1.0, chunk_tokens: int = 1024) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[token_ids] in fp32, (B, T) from (B, T, H).

    Differentiable. Computed in chunks of ``chunk_tokens`` so that at most
    (chunk_tokens x vocabulary) logits exist at a time.
    """
    B, T, H = hidden.shape
    flat_h = hidden.reshape(B * T, H)
    flat_ids = token_ids.reshape(B * T)
    out = []
    for s in range(0, B * T, chunk_tokens):
        logits = flat_h[s:s + chunk_tokens] @ weight.t()  # (chunk, V)
        # fp32 at least; float64 stays float64 (the kernels' references upcast through here).
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        lse = torch.logsumexp(logits, dim=-1)
        sel = logits.gather(1, flat_ids[s:s + chunk_tokens, None]).squeeze(1)
        out.append(sel - lse)
    if not out:
        return hidden.new_zeros((B, T), dtype=torch.float32)
    return torch.cat(out).view(B, T)



def token_logprobs_ref(hidden, weight, token_ids, temperature: float = 1.0, return_entropy: bool = False,
                       bias=None, backend: str = "auto", upcast: bool = False):
    """Plain torch, full logits. ``upcast=True`` computes in float64 (the tests' ground truth)."""
    del backend
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = bias.double() if bias is not None else None
    if bias is None and not return_entropy:
        return eager_token_logprobs(hidden, weight, token_ids, temperature, chunk_tokens=math.prod(hidden.shape[:-1]) or 1)
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(_compute_dtype(logits)) / temperature
    logprobs = torch.log_softmax(logits, -1)
    logp = logprobs.gather(-1, token_ids[..., None]).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logprobs.exp() * logprobs).sum(-1)
