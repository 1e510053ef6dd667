"""Selected-token log-probabilities straight from hidden states and the lm_head weight.

    logp[n] = log softmax((hidden[n] @ weight.T + bias) / temperature)[token_ids[n]]      fp32, (N,)

without ever storing the (N, V) logits: the heavy part of every GRPO pass (policy with grad, old,
reference and PCG-teacher without). This file holds the Triton kernels, their launch
configurations per GPU architecture, their launch wrappers, the memory-bounded PyTorch path used on
machines without CUDA, the autograd Function both share, the public ``token_logprobs`` and its
plain-torch reference.

Forward kernel (grid: row tiles x vocabulary splits): each program walks its share of the
vocabulary in BLOCK_V tiles, computes the (BLOCK_M, BLOCK_V) logit tile with a K-loop of
``tl.dot`` over the hidden size, and folds it into an online log-sum-exp (running max ``m``, running
sum ``l``), the selected token's logit and, for scoring passes, the running sum of ``p * z`` the
entropy needs. Logit tiles live in registers only. The per-split partials (SPLITS, N) are merged
in a few O(N) torch ops (more splits = more programs in flight when N is small).

Backward: d logits = g * (onehot - softmax) / temperature, with g = dL/dlogp the per-token
upstream scalar, recomputed tile by tile from the saved log-sum-exp; then d hidden = dZ @ W and
d weight = dZ.T @ X. Three strategies (``BackwardOptions.strategy``, docs/kernels.md):

- ``"gemm"`` (default, deterministic): the d logits of fixed (PANEL rows x PANEL cols) panels are
  written to a buffer in the input dtype by ``_linear_logprob_dlogits_kernel``, and the two
  products run as dense GEMMs per panel (cuBLAS on a GPU) in a fixed panel order; the memory budget
  (``chunk_mb``) decides how many panels one launch fills, never the order of any sum.
- ``"atomic"``: ``_linear_logprob_bwd_kernel`` (grid: row tiles x vocabulary tiles, Cut-Cross-
  Entropy style) adds each tile's ``dz @ W_tile`` into d hidden and ``dz.T @ X_tile`` into d weight
  with fp32 atomics (run-to-run differences in the last bits).
- ``"sparse"``: the atomic kernel, skipping the products of vocabulary tiles whose softmax mass is
  below the input dtype's resolution (counted in the metrics).

Row tiles whose g is all zero (masked tokens) are skipped. Vocabulary sizes that are not a multiple
of BLOCK_V are masked in every kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args

import torch
import triton
import triton.language as tl

from ._backend import device_arch, launch, resolve_backend, triton_interpreted

# --------------------------------------------------------------------------------------------- #
# Triton kernels: forward
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


# --------------------------------------------------------------------------------------------- #
# Triton kernels: backward (the "atomic" / "sparse" kernel and the "gemm" d-logits kernel)
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _dlogit_tile(X, W, BIAS, IDS, LSE, g, rows, rows64, row_ok, cols, cols64, col_ok, H, stride_xn,
                 stride_wv, inv_t, HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """(dz, p, onehot), each (BLOCK_M, BLOCK_V) fp32: the recomputed softmax p of the tile and
    dz = (onehot - p) * g / T, zero outside the valid rows and columns."""
    ids = tl.load(IDS + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    acc = _logit_tile(X, W, BIAS, rows64, row_ok, cols, cols64, col_ok, H, stride_xn, stride_wv,
                      HAS_BIAS, UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    ok = row_ok[:, None] & col_ok[None, :]
    p = tl.where(ok, tl.exp(acc * inv_t - lse[:, None]), 0.0)
    onehot = tl.where(ok & (cols[None, :] == ids[:, None]), 1.0, 0.0)
    # d loss / d (x . w): the temperature's 1/T and the upstream per-token scalar folded in.
    dz = (onehot - p) * (g * inv_t)[:, None]
    return dz, p, onehot


@triton.jit
def _linear_logprob_bwd_kernel(
    X, W, BIAS, IDS, LSE, G,              # (N, H), (V, H), (V,), (N,), (N,) fp32, (N,) fp32
    DX, DW, DB,                           # fp32 accumulators: (N, H), (V, H), (V,)
    STATS,                                # (2,) int32: [tiles skipped, tiles with a live row] (SPARSE)
    N, V, H, stride_xn, stride_wv, inv_t, sparse_mass,
    HAS_BIAS: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, SPARSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # "atomic" and "sparse": one program per (row tile, vocabulary tile) adds its products into the
    # fp32 gradients with atomics (every element of DX gets V / BLOCK_V adds, of DW N / BLOCK_M).
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
        dz, p, onehot = _dlogit_tile(X, W, BIAS, IDS, LSE, g, rows, rows64, row_ok, cols, cols64, col_ok, H,
                                     stride_xn, stride_wv, inv_t, HAS_BIAS, UPCAST_DOT, DOT_PRECISION,
                                     BLOCK_M, BLOCK_V, BLOCK_K)
        keep = tl.max(tl.abs(g), 0) > 0.0
        if SPARSE:
            # Skip when, for every live row, the tile holds no selected token and less softmax
            # mass than sparse_mass = u * BLOCK_V / V (u: the input dtype's unit roundoff): all
            # skipped tiles of a row together hold < u of its mass, so the dropped part of its
            # d hidden is below the dtype's rounding of the row's own scale |g| / T * |W|.
            live = row_ok & (g != 0.0)
            mass = tl.max(tl.where(live, tl.sum(p, 1), 0.0), 0)
            hit = tl.max(tl.where(live, tl.sum(onehot, 1), 0.0), 0)
            keep = (mass >= sparse_mass) | (hit > 0.0)
            tl.atomic_add(STATS + 1, 1)
            tl.atomic_add(STATS, tl.where(keep, 0, 1))
        if keep:
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


# first_panel / row_panels change from launch to launch: not specialised on (no recompile per value).
@triton.jit(do_not_specialize=["first_panel", "row_panels"])
def _linear_logprob_dlogits_kernel(
    X, W, BIAS, IDS, LSE, G,              # (N, H), (V, H), (V,), (N,), (N,) fp32, (N,) fp32
    DZ,                                   # (chunk panels, panel_rows, panel_cols), the input dtype
    N, V, H, stride_xn, stride_wv, inv_t,
    first_panel, row_panels, panel_rows, panel_cols,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # "gemm": grid (row tiles of a panel, vocabulary tiles of a panel, panels of the chunk). Panel
    # p (= first_panel + program_id(2)) is column panel p // row_panels, row panel p % row_panels:
    # column panels outer, so consecutive panels share their W columns. No atomics: each element of
    # DZ is written by exactly one program.
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_p = tl.program_id(2)
    panel = first_panel + pid_p
    r0 = (panel % row_panels) * panel_rows
    c0 = (panel // row_panels) * panel_cols
    local_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = r0 + local_r
    cols = c0 + local_c
    row_ok = (local_r < panel_rows) & (rows < N)
    col_ok = (local_c < panel_cols) & (cols < V)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    out = DZ + pid_p.to(tl.int64) * panel_rows * panel_cols + local_r[:, None] * panel_cols + local_c[None, :]
    dz = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    if tl.max(tl.abs(g), 0) > 0.0:        # masked tokens: zeros without the recompute
        dz, p, onehot = _dlogit_tile(X, W, BIAS, IDS, LSE, g, rows, rows.to(tl.int64), row_ok, cols,
                                     cols.to(tl.int64), col_ok, H, stride_xn, stride_wv, inv_t, HAS_BIAS,
                                     UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    tl.store(out, dz.to(DZ.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------- #
# Launch configurations, per GPU architecture and input width
# --------------------------------------------------------------------------------------------- #

# Tiles and launch options of each kernel: fwd_* (forward), bwd_* ("atomic" / "sparse" backward),
# dz_* ("gemm" d-logits kernel); *_m / *_v / *_k are BLOCK_M / BLOCK_V / BLOCK_K. Keyed by
# (architecture, bytes per input element): fp32 inputs (tf32 dots) need twice the shared memory per
# pipeline stage. Every entry is compiled for sm_80 and sm_90 at the tiny / 2B / 7B shapes by the
# compile gate (``fastebm doctor --compile``; tests/doctor/test_compile_gate.py), which fails on a
# spill or on shared memory beyond the architecture's limit; the "sm80" entries also stay within
# the 99 KiB of sm_86 / sm_89. Chosen so that the gate is green: NOT tuned for speed on hardware
# (no GPU was available when they were set; docs/kernels.md has the compiled registers / shared).
TILES = {
    ("sm80", 2): dict(fwd_m=64, fwd_v=128, fwd_k=64, fwd_warps=8, fwd_stages=3,
                      bwd_m=64, bwd_v=64, bwd_k=64, bwd_warps=8, bwd_stages=2,
                      dz_m=64, dz_v=128, dz_k=64, dz_warps=8, dz_stages=3),
    ("sm90", 2): dict(fwd_m=64, fwd_v=128, fwd_k=64, fwd_warps=8, fwd_stages=4,
                      bwd_m=64, bwd_v=64, bwd_k=64, bwd_warps=8, bwd_stages=2,
                      dz_m=64, dz_v=128, dz_k=64, dz_warps=8, dz_stages=4),
    # fp32 inputs: "ieee" dots (torch's default, allow_tf32 = False) need far more registers than tf32 ones
    ("sm80", 4): dict(fwd_m=32, fwd_v=128, fwd_k=32, fwd_warps=8, fwd_stages=3,
                      bwd_m=32, bwd_v=64, bwd_k=16, bwd_warps=8, bwd_stages=2,
                      dz_m=64, dz_v=128, dz_k=16, dz_warps=8, dz_stages=3),
    ("sm90", 4): dict(fwd_m=32, fwd_v=128, fwd_k=32, fwd_warps=8, fwd_stages=3,
                      bwd_m=32, bwd_v=64, bwd_k=16, bwd_warps=8, bwd_stages=2,
                      dz_m=64, dz_v=128, dz_k=16, dz_warps=8, dz_stages=3),
}
# Under the interpreter smaller tiles keep the numpy work per program small. Tests monkeypatch this
# to cross tile boundaries.
TILES_INTERPRET = dict(fwd_m=16, fwd_v=64, fwd_k=32, bwd_m=16, bwd_v=64, bwd_k=32, dz_m=16, dz_v=64, dz_k=32,
                       num_warps=4, num_stages=1)
MAX_SPLITS = 64

# "gemm" panels (rows, vocabulary columns): FIXED sizes, so that the order of every sum (d hidden
# over column panels, d weight over row panels) depends on the shape alone, never on the memory
# budget. Large enough for cuBLAS to run near its peak (8192 x 8192 x H GEMMs); one panel of d logits
# is 128 MiB in bf16.
PANEL_GPU = (8192, 8192)
PANEL_INTERPRET = (32, 256)
PANEL_CPU = (1024, 4096)            # the PyTorch path: 16 MiB of fp32 d logits per panel


def _tiles(device: torch.device, dtype: torch.dtype) -> dict:
    """The launch configuration for inputs of ``dtype`` on ``device`` (see ``TILES``)."""
    arch = device_arch(device)
    if arch == "interpret":
        return TILES_INTERPRET
    return TILES[(arch, 4 if dtype == torch.float32 else 2)]


def _launch_opts(t: dict, kernel: str) -> dict:
    """num_warps / num_stages of ``kernel`` ("fwd" | "bwd" | "dz"); a table without per-kernel
    entries (the interpreter's) uses its shared ``num_warps`` / ``num_stages``."""
    return dict(num_warps=t.get(f"{kernel}_warps", t.get("num_warps", 4)),
                num_stages=t.get(f"{kernel}_stages", t.get("num_stages", 1)))


def _panels(device: torch.device) -> tuple[int, int]:
    return PANEL_INTERPRET if device_arch(device) == "interpret" else PANEL_GPU


# --------------------------------------------------------------------------------------------- #
# Forward launch wrapper (shape checks, allocation, grid; no autograd)
# --------------------------------------------------------------------------------------------- #

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
    t = _tiles(hidden2d.device, hidden2d.dtype)
    n_m = triton.cdiv(N, t["fwd_m"])
    v_tiles = triton.cdiv(V, t["fwd_v"])
    if num_splits is None:  # enough programs to fill the GPU when N is small
        num_splits = max(1, min(MAX_SPLITS, (264 + n_m - 1) // n_m)) if not triton_interpreted() else 2
    tiles_per_split = triton.cdiv(v_tiles, min(num_splits, v_tiles))
    splits = triton.cdiv(v_tiles, tiles_per_split)  # every split starts on a valid column
    part = torch.empty((4, splits, N), device=hidden2d.device, dtype=torch.float32)
    if N:
        launch(_linear_logprob_fwd_kernel, (n_m, splits),
            hidden2d, weight, bias if bias is not None else hidden2d, ids,
            part[0], part[1], part[2], part[3],
            N, V, H, hidden2d.stride(0), weight.stride(0), 1.0 / temperature, tiles_per_split,
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
            DOT_PRECISION=_dot_precision(hidden2d.dtype), UPCAST_DOT=triton_interpreted(),
            BLOCK_M=t["fwd_m"], BLOCK_V=t["fwd_v"], BLOCK_K=t["fwd_k"],
            **_launch_opts(t, "fwd"),
        )
    m, l, sel, tz = part
    m_all = m.amax(0)                                  # (N,)
    scale = torch.exp(m - m_all)                       # (SPLITS, N)
    l_all = (l * scale).sum(0)
    lse = m_all + torch.log(l_all)
    logp = sel.sum(0) - lse
    entropy = lse - (tz * scale).sum(0) / l_all if with_entropy else None
    return logp, lse, entropy


# --------------------------------------------------------------------------------------------- #
# Backward strategies: options and launch wrappers (shape checks, allocation, grid; no autograd)
# --------------------------------------------------------------------------------------------- #

BackwardStrategy = Literal["gemm", "atomic", "sparse"]
BACKWARD_STRATEGIES: tuple[str, ...] = get_args(BackwardStrategy)
# Strategies that add into the gradients with float atomics: the order of the additions depends on
# the GPU's scheduling, so two runs of the same step differ in the last bits.
NONDETERMINISTIC = frozenset({"atomic", "sparse"})
DEFAULT_CHUNK_MB = 512.0


@dataclass(frozen=True)
class BackwardOptions:
    """How the fused backward computes d hidden and d weight (a fastebm extension of Liger's API).

    ``strategy``: ``"gemm"`` (default; deterministic: d logits of fixed panels to a buffer, then
    dense GEMMs in a fixed order), ``"atomic"`` (one kernel, fp32 atomic adds) or ``"sparse"``
    (the atomic kernel, skipping vocabulary tiles whose softmax mass is below the input dtype's
    resolution; exact up to that rounding). ``chunk_mb``: the most MiB of d logits "gemm" holds at
    once (at least one panel); it changes the number of launches, never a result bit.
    ``deterministic=True`` refuses the strategies with float atomics. On the PyTorch (CPU) path
    there are no atomics: "atomic" and "sparse" run the token x vocabulary chunk loop.
    """

    strategy: BackwardStrategy = "gemm"
    chunk_mb: float = DEFAULT_CHUNK_MB
    deterministic: bool = False

    def __post_init__(self):
        if self.strategy not in BACKWARD_STRATEGIES:
            raise ValueError(f"backward strategy must be one of {BACKWARD_STRATEGIES}, got {self.strategy!r}")
        if isinstance(self.chunk_mb, bool) or not isinstance(self.chunk_mb, (int, float)) or not (
                math.isfinite(self.chunk_mb) and self.chunk_mb > 0):
            raise ValueError(f"backward chunk_mb must be a finite number > 0, got {self.chunk_mb!r}")
        if self.deterministic and self.strategy in NONDETERMINISTIC:
            raise ValueError(f"backward strategy {self.strategy!r} adds into the gradients with float atomics "
                             f"(run-to-run differences in the last bits); deterministic=True needs 'gemm'")


def resolve_backward(backward: Union[str, BackwardOptions, None]) -> BackwardOptions:
    """``BackwardOptions`` from a strategy name, an options object or None (the defaults)."""
    if backward is None:
        return BackwardOptions()
    if isinstance(backward, str):
        return BackwardOptions(strategy=backward)
    if not isinstance(backward, BackwardOptions):
        raise TypeError(f"backward must be a strategy name {BACKWARD_STRATEGIES} or a BackwardOptions, "
                        f"got {type(backward).__name__}")
    return backward


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the gap between 1 and the next number of ``dtype``: bf16 2^-8, fp16 2^-11, fp32 2^-24."""
    return torch.finfo(dtype).eps / 2


def _atomic_bwd_triton(hidden2d, weight, ids, bias, lse, g, temperature, compute_dw, compute_db, sparse, stats):
    N, H = hidden2d.shape
    V = weight.shape[0]
    t = _tiles(hidden2d.device, hidden2d.dtype)
    dx = torch.zeros((N, H), device=hidden2d.device, dtype=torch.float32)
    dw = torch.zeros((V, H), device=weight.device, dtype=torch.float32) if compute_dw else None
    db = torch.zeros((V,), device=weight.device, dtype=torch.float32) if compute_db else None
    if sparse and stats is None:
        stats = torch.zeros(2, device=hidden2d.device, dtype=torch.int32)
    if N:
        grid = (triton.cdiv(N, t["bwd_m"]), triton.cdiv(V, t["bwd_v"]))
        launch(_linear_logprob_bwd_kernel, grid,
               hidden2d, weight, bias if bias is not None else hidden2d, ids, lse, g,
               dx, dw if dw is not None else dx, db if db is not None else dx, stats if sparse else ids,
               N, V, H, hidden2d.stride(0), weight.stride(0), 1.0 / temperature,
               unit_roundoff(hidden2d.dtype) * min(1.0, t["bwd_v"] / V),
               HAS_BIAS=bias is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, SPARSE=sparse,
               DOT_PRECISION=_dot_precision(hidden2d.dtype), UPCAST_DOT=triton_interpreted(),
               BLOCK_M=t["bwd_m"], BLOCK_V=t["bwd_v"], BLOCK_K=t["bwd_k"], **_launch_opts(t, "bwd"))
    return dx, dw, db


_INPLACE_MIXED_ADDMM = [True]   # cleared if this torch build refuses addmm(out_dtype=..., out=self)


def _addmm_f32_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """c (fp32) += a @ b for a, b in the input dtype, accumulated in fp32 (cuBLAS's epilogue adds c)."""
    if a.dtype == c.dtype:
        c.addmm_(a, b)
    elif a.device.type == "cpu":       # no mixed-dtype addmm on the CPU; bf16/fp16 products are exact in fp32
        c.addmm_(a.float(), b.float())
    else:
        if _INPLACE_MIXED_ADDMM[0]:
            try:
                torch.addmm(c, a, b, out_dtype=c.dtype, out=c)
                return
            except (RuntimeError, TypeError):   # same sums, through an fp32 temporary of c's size
                _INPLACE_MIXED_ADDMM[0] = False
        c.add_(torch.mm(a, b, out_dtype=c.dtype))


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, accumulated in fp32 and rounded once to out's dtype."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif a.device.type == "cpu":
        out.copy_(a.float() @ b.float())
    else:
        torch.mm(a, b, out_dtype=out.dtype, out=out)


def gemm_panel_plan(N: int, V: int, panel: tuple[int, int], elem_bytes: int, chunk_mb: float) -> dict:
    """The "gemm" strategy's panels for N tokens and V columns: rows / cols per panel, row and column
    panel counts, and panels per launch (``chunk``: as many as ``chunk_mb`` holds, at least one)."""
    pr, pc = min(panel[0], max(N, 1)), min(panel[1], V)
    row_panels, col_panels = triton.cdiv(N, pr), triton.cdiv(V, pc)
    panels = row_panels * col_panels
    chunk = max(1, min(panels, int(chunk_mb * 2 ** 20) // (pr * pc * elem_bytes)))
    return dict(panel_rows=pr, panel_cols=pc, row_panels=row_panels, col_panels=col_panels, panels=panels,
                chunk=chunk, buffer_bytes=chunk * pr * pc * elem_bytes)


def _gemm_bwd_triton(hidden2d, weight, ids, bias, lse, g, temperature, compute_dw, compute_db, chunk_mb):
    """"gemm": for each chunk of panels, one launch writes their d logits (input dtype) to a buffer;
    then per panel, in order, d hidden[rows] += dZ @ W[cols] and d weight[cols] (+)= dZ.T @ X[rows]
    as dense GEMMs. Column panels outer: d weight's rows are finished one column panel at a time
    (written once, in the weight's dtype, when there is one row panel), and d hidden accumulates in
    fp32 over the column panels. No host synchronisation."""
    N, H = hidden2d.shape
    V = weight.shape[0]
    dev, cdt = hidden2d.device, hidden2d.dtype
    t = _tiles(dev, cdt)
    plan = gemm_panel_plan(N, V, _panels(dev), hidden2d.element_size(), chunk_mb)
    pr, pc, n_rp = plan["panel_rows"], plan["panel_cols"], plan["row_panels"]
    dx = torch.zeros((N, H), device=dev, dtype=torch.float32)
    dw = torch.empty((V, H), device=weight.device, dtype=weight.dtype) if compute_dw else None
    db = torch.zeros((V,), device=weight.device, dtype=torch.float32) if compute_db else None
    if not N:
        return dx, dw.zero_() if dw is not None else None, db
    buf = torch.empty((plan["chunk"], pr, pc), device=dev, dtype=cdt)       # the d-logits chunk
    # d weight of one column panel summed over several row panels: fp32 (panel_cols, H)
    dw_acc = torch.empty((pc, H), device=dev, dtype=torch.float32) if compute_dw and n_rp > 1 else None
    for first in range(0, plan["panels"], plan["chunk"]):
        k = min(plan["chunk"], plan["panels"] - first)
        launch(_linear_logprob_dlogits_kernel, (triton.cdiv(pr, t["dz_m"]), triton.cdiv(pc, t["dz_v"]), k),
               hidden2d, weight, bias if bias is not None else hidden2d, ids, lse, g, buf,
               N, V, H, hidden2d.stride(0), weight.stride(0), 1.0 / temperature, first, n_rp, pr, pc,
               HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(cdt), UPCAST_DOT=triton_interpreted(),
               BLOCK_M=t["dz_m"], BLOCK_V=t["dz_v"], BLOCK_K=t["dz_k"], **_launch_opts(t, "dz"))
        for i in range(k):
            col_panel, row_panel = divmod(first + i, n_rp)
            r0, c0 = row_panel * pr, col_panel * pc
            nr, nc = min(pr, N - r0), min(pc, V - c0)
            dz = buf[i, :nr, :nc]                         # (nr, nc), leading dimension pc in every chunking
            w_p = weight[c0:c0 + nc].to(cdt)
            x_p = hidden2d[r0:r0 + nr]
            _addmm_f32_(dx[r0:r0 + nr], dz, w_p)
            if dw is not None:
                if n_rp == 1:
                    _mm_into(dw[c0:c0 + nc], dz.t(), x_p)
                else:
                    acc = dw_acc[:nc]
                    if row_panel == 0:
                        _mm_into(acc, dz.t(), x_p)
                    else:
                        _addmm_f32_(acc, dz.t(), x_p)
                    if row_panel == n_rp - 1:
                        dw[c0:c0 + nc].copy_(acc)
            if db is not None:
                db[c0:c0 + nc] += torch.sum(dz, 0, dtype=torch.float32)
    return dx, dw, db


def linear_logprob_bwd_triton(hidden2d, weight, ids, bias, lse, grad_logp, temperature=1.0,
                              compute_dw=True, compute_db=True, backward: Union[str, BackwardOptions, None] = None,
                              stats: Optional[torch.Tensor] = None):
    """fp32 d hidden2d (N, H), d weight (V, H) or None (fp32; the weight's dtype for "gemm") and fp32
    d bias or None, for upstream dL/dlogp ``grad_logp``. ``stats`` (2,) int32, "sparse" only: adds
    [vocabulary tiles skipped, tiles with a live row]."""
    opts = resolve_backward(backward)
    hidden2d = hidden2d if hidden2d.stride(1) == 1 else hidden2d.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    compute_db = compute_db and bias is not None
    ids, lse, g = ids.contiguous(), lse.contiguous(), grad_logp.float().contiguous()
    if opts.strategy == "gemm":
        return _gemm_bwd_triton(hidden2d, weight, ids, bias, lse, g, temperature, compute_dw, compute_db,
                                opts.chunk_mb)
    return _atomic_bwd_triton(hidden2d, weight, ids, bias, lse, g, temperature, compute_dw, compute_db,
                              opts.strategy == "sparse", stats)


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


# Vocabulary tile of the PyTorch path's "sparse" decisions (one decision per token chunk and tile).
SPARSE_TILE_CPU = 128


def _bwd_torch_chunks(hidden2d, weight, ids, bias, lse, grad_logp, temperature, compute_dw, compute_db,
                      sparse=False, stats=None):
    """"atomic" / "sparse" on the PyTorch path: token x vocabulary chunks, fp32 accumulation."""
    N, H = hidden2d.shape
    V = weight.shape[0]
    cd = _compute_dtype(hidden2d)
    inv_t = 1.0 / temperature
    dx = torch.zeros((N, H), device=hidden2d.device, dtype=cd)
    dw = torch.zeros((V, H), device=weight.device, dtype=cd) if compute_dw else None
    db = torch.zeros((V,), device=weight.device, dtype=cd) if compute_db else None
    g_all = grad_logp.to(cd) * inv_t
    tok, voc = _chunks(N, V)
    if sparse:  # tiles must not straddle vocabulary chunks
        voc = max(SPARSE_TILE_CPU, voc - voc % SPARSE_TILE_CPU)
        mass_min = unit_roundoff(hidden2d.dtype) * min(1.0, SPARSE_TILE_CPU / V)
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
                nv = wc.shape[0]
                dz = x @ wc.t()                                              # (n, voc) logits chunk
                if bias is not None:
                    dz += bias[v0:v0 + voc].to(cd)
                dz.mul_(inv_t).sub_(lse_c[:, None]).exp_()                   # softmax
                hit = (ids_c >= v0) & (ids_c < v0 + nv)
                keep = None
                if sparse:
                    live = g != 0
                    n_tiles = -(-nv // SPARSE_TILE_CPU)
                    pad = n_tiles * SPARSE_TILE_CPU - nv
                    mass = torch.nn.functional.pad(dz[live], (0, pad)).view(-1, n_tiles, SPARSE_TILE_CPU).sum(2)
                    keep_t = mass.amax(0) >= mass_min                         # (n_tiles,)
                    keep_t[(ids_c[live & hit] - v0) // SPARSE_TILE_CPU] = True   # a selected token's tile
                    stats[1] += n_tiles
                    stats[0] += int(n_tiles - keep_t.sum())
                    keep = keep_t.repeat_interleave(SPARSE_TILE_CPU)[:nv].nonzero().squeeze(1)
                dz.mul_(-g[:, None])                                         # -g * softmax
                if bool(hit.any()):
                    dz[rows[hit], ids_c[hit] - v0] += g[hit]                # + g * onehot
                if keep is not None:
                    if keep.numel() == 0:
                        continue
                    dz, wc = dz[:, keep], wc[keep]
                dx[s:s + tok].addmm_(dz, wc)
                if dw is not None:
                    if keep is None:
                        dw[v0:v0 + voc].addmm_(dz.t(), x)
                    else:
                        dw.index_add_(0, keep + v0, dz.t() @ x)
                if db is not None:
                    if keep is None:
                        db[v0:v0 + voc] += dz.sum(0)
                    else:
                        db.index_add_(0, keep + v0, dz.sum(0))
    return dx, dw, db


def _gemm_bwd_torch(hidden2d, weight, ids, bias, lse, grad_logp, temperature, compute_dw, compute_db):
    """"gemm" on the PyTorch path: the same fixed panels and panel order as on the GPU, one panel of
    d logits (PANEL_CPU, 16 MiB fp32) at a time."""
    N, H = hidden2d.shape
    V = weight.shape[0]
    cd = _compute_dtype(hidden2d)
    inv_t = 1.0 / temperature
    plan = gemm_panel_plan(N, V, PANEL_CPU, torch.tensor([], dtype=cd).element_size(), 0)
    pr, pc = plan["panel_rows"], plan["panel_cols"]
    dx = torch.zeros((N, H), device=hidden2d.device, dtype=cd)
    dw = torch.zeros((V, H), device=weight.device, dtype=cd) if compute_dw else None
    db = torch.zeros((V,), device=weight.device, dtype=cd) if compute_db else None
    g_all = grad_logp.to(cd) * inv_t
    live = [bool(g_all[r0:r0 + pr].any()) for r0 in range(0, N, pr)]    # host sync, CPU only
    with torch.no_grad():
        for c0 in range(0, V, pc):
            wc = weight[c0:c0 + pc].to(cd)                                   # (nc, H)
            for r, r0 in enumerate(range(0, N, pr)):
                if not live[r]:                                               # masked tokens only
                    continue
                x = hidden2d[r0:r0 + pr].to(cd)
                g, ids_c = g_all[r0:r0 + pr], ids[r0:r0 + pr]
                dz = x @ wc.t()                                               # (nr, nc) logits panel
                if bias is not None:
                    dz += bias[c0:c0 + pc].to(cd)
                dz.mul_(inv_t).sub_(lse[r0:r0 + pr, None].to(cd)).exp_().mul_(-g[:, None])
                hit = ((ids_c >= c0) & (ids_c < c0 + wc.shape[0])).nonzero().squeeze(1)
                dz[hit, ids_c[hit] - c0] += g[hit]
                dx[r0:r0 + pr].addmm_(dz, wc)
                if dw is not None:
                    dw[c0:c0 + pc].addmm_(dz.t(), x)
                if db is not None:
                    db[c0:c0 + pc] += dz.sum(0)
    return dx, dw, db


def linear_logprob_bwd_torch(hidden2d, weight, ids, bias, lse, grad_logp, temperature=1.0,
                             compute_dw=True, compute_db=True, backward: Union[str, BackwardOptions, None] = None,
                             stats: Optional[torch.Tensor] = None):
    """Same contract as ``linear_logprob_bwd_triton`` (compute-dtype results); recomputes logits."""
    opts = resolve_backward(backward)
    compute_db = compute_db and bias is not None
    if opts.strategy == "gemm":
        return _gemm_bwd_torch(hidden2d, weight, ids, bias, lse, grad_logp, temperature, compute_dw, compute_db)
    sparse = opts.strategy == "sparse"
    if sparse and stats is None:
        stats = torch.zeros(2, dtype=torch.int32, device=hidden2d.device)
    return _bwd_torch_chunks(hidden2d, weight, ids, bias, lse, grad_logp, temperature, compute_dw, compute_db,
                             sparse, stats)


# --------------------------------------------------------------------------------------------- #
# Autograd Function and public function
# --------------------------------------------------------------------------------------------- #


class LinearLogprobFunction(torch.autograd.Function):
    """logp (N,) fp32 of hidden2d @ weight.T (+ bias) / T; saves only inputs and lse (N,).

    ``with_entropy``: also the per-token entropy (N,), from the same forward pass (the kernels'
    running sum of p * z), as a second output that carries no gradient (top_entropy_quantile's mask
    and the entropy metric need its value only). The backward runs ``backward_opts.strategy``;
    ``stats`` ((2,) int32 or None) receives the "sparse" strategy's tile counts."""

    @staticmethod
    def forward(ctx, hidden2d, weight, ids, bias, temperature, backend, with_entropy=False, backward_opts=None,
                stats=None):
        fwd = linear_logprob_fwd_triton if backend == "triton" else linear_logprob_fwd_torch
        logp, lse, entropy = fwd(hidden2d, weight, ids, bias, temperature, with_entropy)
        ctx.save_for_backward(hidden2d, weight, ids, bias, lse)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.backward_opts, ctx.stats = resolve_backward(backward_opts), stats
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, *_grad_entropy):  # the entropy output has no gradient
        hidden2d, weight, ids, bias, lse = ctx.saved_tensors
        bwd = linear_logprob_bwd_triton if ctx.backend == "triton" else linear_logprob_bwd_torch
        dx, dw, db = bwd(hidden2d, weight, ids, bias, lse, grad_logp, ctx.temperature,
                         compute_dw=ctx.needs_input_grad[1], compute_db=ctx.needs_input_grad[3],
                         backward=ctx.backward_opts, stats=ctx.stats)
        return (dx.to(hidden2d.dtype) if ctx.needs_input_grad[0] else None,
                dw.to(weight.dtype) if dw is not None else None,
                None,
                db.to(bias.dtype) if db is not None else None,
                None, None, None, None, None)


def linear_logprobs(hidden, weight, token_ids, temperature: float = 1.0, bias=None,
                    backend: str = "auto", return_entropy: bool = False,
                    backward: Union[str, BackwardOptions, None] = None, stats: Optional[torch.Tensor] = None):
    """Differentiable log-probs (..., ) fp32 for hidden (..., H); used by the GRPO losses.

    ``return_entropy``: ``(logp, entropy)``, the entropy (..., ) from the same forward pass, without
    gradient. ``backward``: the backward strategy (``BackwardOptions`` or its name; default "gemm").
    ``stats``: an optional (2,) int32 tensor the "sparse" backward adds its tile counts to.
    """
    lead = hidden.shape[:-1]
    b = resolve_backend(backend, hidden.device)
    out = LinearLogprobFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, token_ids.reshape(-1), bias,
                                      float(temperature), b, bool(return_entropy), resolve_backward(backward), stats)
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
