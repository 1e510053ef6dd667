"""The GRPO loss for code that already holds logits (B, T, V).

Forward kernel (grid: one program per token row): one pass over the row in BLOCK_V chunks with an
online log-sum-exp and the selected logit -> fp32 logp and lse. Backward kernel (same grid): one
pass writing d logits = g * (onehot - softmax) / temperature straight into the gradient tensor,
with g = dL/dlogp the per-token upstream scalar; no second full-size temporary is made (rows of
masked tokens are written as zeros without reading the logits). The O(B * T) GRPO epilogue is
``grpo_semantics.grpo_loss_from_logps``, shared with every other path.

Without CUDA the public function runs PyTorch on the logits the caller already holds, one chunk of
rows at a time so the temporaries stay bounded.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._backend import launch, resolve_backend, triton_interpreted
from .grpo_semantics import GRPOLossOptions, grpo_loss_from_logps, loss_metrics, resolve_options

# --------------------------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------------------------- #


@triton.jit
def _logits_logprob_fwd_kernel(LOGITS, IDS, LOGP, LSE, T, V, stride_b, stride_t, inv_t,
                               BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    b = row // T
    t = row - b * T
    base = LOGITS + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)   # per-lane running max and sum,
    s = tl.zeros([BLOCK_V], tl.float32)                  # merged once at the end
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, z)
        # lanes that have only seen -inf stay at s = 0 (avoid exp(-inf - -inf) = nan)
        s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(z - m_new))
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    tok = tl.load(IDS + row)
    sel = tl.load(base + tok).to(tl.float32) * inv_t
    tl.store(LOGP + row, sel - lse)
    tl.store(LSE + row, lse)


@triton.jit
def _logits_logprob_bwd_kernel(LOGITS, DLOGITS, IDS, LSE, G, T, V, stride_b, stride_t,
                               dstride_b, dstride_t, inv_t, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    b = row // T
    t = row - b * T
    base = LOGITS + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t
    dbase = DLOGITS + b.to(tl.int64) * dstride_b + t.to(tl.int64) * dstride_t
    g = tl.load(G + row) * inv_t
    tok = tl.load(IDS + row)
    lse = tl.load(LSE + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        if g == 0.0:  # masked token: zeros, without reading the row
            d = tl.zeros([BLOCK_V], tl.float32)
        else:
            z = tl.load(base + cols, mask=col_ok, other=float("-inf")).to(tl.float32) * inv_t
            d = (tl.where(cols == tok, 1.0, 0.0) - tl.exp(z - lse)) * g
        tl.store(dbase + cols, d.to(DLOGITS.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------------------------- #
# Launch wrappers
# --------------------------------------------------------------------------------------------- #

BLOCK_V_GPU = 4096
BLOCK_V_INTERPRET = 256


def _block_v() -> int:
    return BLOCK_V_INTERPRET if triton_interpreted() else BLOCK_V_GPU


def _prep(logits):
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got {tuple(logits.shape)}")
    return logits if logits.stride(2) == 1 else logits.contiguous()


def logits_logprob_fwd_triton(logits, ids, temperature=1.0):
    """(logp (B, T), lse (B, T)) fp32 of log softmax(logits / T) at ``ids``."""
    logits = _prep(logits)
    B, T, V = logits.shape
    logp = torch.empty((B, T), device=logits.device, dtype=torch.float32)
    lse = torch.empty((B, T), device=logits.device, dtype=torch.float32)
    if B * T:
        launch(_logits_logprob_fwd_kernel, (B * T,),
            logits, ids.contiguous(), logp, lse, T, V, logits.stride(0), logits.stride(1),
            1.0 / temperature, BLOCK_V=_block_v(), num_warps=8 if not triton_interpreted() else 1)
    return logp, lse


def logits_logprob_bwd_triton(logits, ids, lse, grad_logp, temperature=1.0):
    """d logits (B, T, V) in the logits' dtype: the only full-size tensor the backward makes."""
    logits = _prep(logits)
    B, T, V = logits.shape
    dlogits = torch.empty_like(logits)
    if B * T:
        launch(_logits_logprob_bwd_kernel, (B * T,),
            logits, dlogits, ids.contiguous(), lse.contiguous(), grad_logp.float().contiguous(), T, V,
            logits.stride(0), logits.stride(1), dlogits.stride(0), dlogits.stride(1), 1.0 / temperature,
            BLOCK_V=_block_v(), num_warps=8 if not triton_interpreted() else 1)
    return dlogits


# PyTorch path: rows per chunk, so temporaries are (CHUNK_ROWS, V) whatever B * T is.
CHUNK_ROWS = 32


def logits_logprob_fwd_torch(logits, ids, temperature=1.0):
    B, T, V = logits.shape
    flat, flat_ids = logits.reshape(B * T, V), ids.reshape(B * T)
    cd = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.empty(B * T, device=logits.device, dtype=cd)
    lse = torch.empty(B * T, device=logits.device, dtype=cd)
    with torch.no_grad():
        for s in range(0, B * T, CHUNK_ROWS):
            z = flat[s:s + CHUNK_ROWS].to(cd) / temperature
            lse_c = torch.logsumexp(z, -1)
            lse[s:s + CHUNK_ROWS] = lse_c
            logp[s:s + CHUNK_ROWS] = z.gather(1, flat_ids[s:s + CHUNK_ROWS, None]).squeeze(1) - lse_c
    return logp.view(B, T), lse.view(B, T)


def logits_logprob_bwd_torch(logits, ids, lse, grad_logp, temperature=1.0):
    B, T, V = logits.shape
    flat, flat_ids = logits.reshape(B * T, V), ids.reshape(B * T)
    cd = torch.promote_types(logits.dtype, torch.float32)
    g_all, lse_all = grad_logp.reshape(-1).to(cd) / temperature, lse.reshape(-1)
    dlogits = torch.empty((B * T, V), device=logits.device, dtype=logits.dtype)
    with torch.no_grad():
        for s in range(0, B * T, CHUNK_ROWS):
            g = g_all[s:s + CHUNK_ROWS, None]
            d = (flat[s:s + CHUNK_ROWS].to(cd) / temperature).sub_(lse_all[s:s + CHUNK_ROWS, None]).exp_().mul_(-g)
            d.scatter_add_(1, flat_ids[s:s + CHUNK_ROWS, None], g)
            dlogits[s:s + CHUNK_ROWS] = d
    return dlogits.view(B, T, V)


# --------------------------------------------------------------------------------------------- #
# Autograd Function and public function
# --------------------------------------------------------------------------------------------- #


class LogitsLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, temperature, backend):
        fwd = logits_logprob_fwd_triton if backend == "triton" else logits_logprob_fwd_torch
        logp, lse = fwd(logits, ids, temperature)
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature, ctx.backend = temperature, backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, ids, lse = ctx.saved_tensors
        bwd = logits_logprob_bwd_triton if ctx.backend == "triton" else logits_logprob_bwd_torch
        return bwd(logits, ids, lse, grad_logp, ctx.temperature), None, None, None


def logits_entropy(logits, temperature=1.0):
    """No-grad entropy (B, T) of softmax(logits / T), CHUNK_ROWS rows at a time (fp32 at least).

    Only ``top_entropy_quantile < 1`` (or ``return_entropy``) asks for it: one extra read of the
    logits the caller already holds."""
    B, T, V = logits.shape
    flat = logits.detach().reshape(B * T, V)
    cd = torch.promote_types(logits.dtype, torch.float32)
    out = torch.empty(B * T, device=logits.device, dtype=cd)
    with torch.no_grad():
        for s in range(0, B * T, CHUNK_ROWS):
            lp = torch.log_softmax(flat[s:s + CHUNK_ROWS].to(cd) / temperature, -1)
            out[s:s + CHUNK_ROWS] = -(lp.exp() * lp).sum(-1)
    return out.view(B, T)


def grpo_loss(logits, selected_token_ids, attention_mask, advantages, old_per_token_logps=None,
              ref_per_token_logps=None, options: Optional[GRPOLossOptions] = None, *, num_items_in_batch=None,
              vllm_is_ratio=None, sampling_per_token_logps=None, backend: str = "auto", return_entropy: bool = False,
              **option_overrides):
    """``(loss, metrics)`` from logits (B, T, V) of the completion tokens (already aligned with ids).

    Same options, keywords and metrics as ``fused_linear_grpo_loss``; differentiable in ``logits``.
    """
    options = resolve_options(options, option_overrides, "grpo_loss")
    if logits.shape[:2] != selected_token_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match ids {tuple(selected_token_ids.shape)}")
    b = resolve_backend(backend, logits.device)
    logps = LogitsLogprobFunction.apply(logits, selected_token_ids, float(options.temperature), b)
    entropies = None
    if return_entropy or options.top_entropy_quantile < 1.0:
        entropies = logits_entropy(logits, options.temperature)
    out = grpo_loss_from_logps(logps, old_per_token_logps, ref_per_token_logps, advantages, attention_mask,
                               options, num_items_in_batch=num_items_in_batch, vllm_is_ratio=vllm_is_ratio,
                               entropies=entropies, sampling_logps=sampling_per_token_logps)
    return out.loss, loss_metrics(out)


def grpo_loss_ref(logits, selected_token_ids, attention_mask, advantages, old_per_token_logps=None,
                  ref_per_token_logps=None, options: Optional[GRPOLossOptions] = None, *, num_items_in_batch=None,
                  vllm_is_ratio=None, sampling_per_token_logps=None, backend: str = "auto",
                  return_entropy: bool = False, upcast: bool = False, **option_overrides):
    """Plain torch: log_softmax over the full logits; ``upcast=True`` runs in float64."""
    del backend
    options = resolve_options(options, option_overrides, "grpo_loss_ref")
    if upcast:
        logits = logits.double()
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / options.temperature
    logprobs = torch.log_softmax(z, -1)
    logps = logprobs.gather(-1, selected_token_ids[..., None]).squeeze(-1)
    entropies = None
    if return_entropy or options.top_entropy_quantile < 1.0:
        entropies = -(logprobs.exp() * logprobs).sum(-1).detach()
    out = grpo_loss_from_logps(logps, old_per_token_logps, ref_per_token_logps, advantages, attention_mask,
                               options, num_items_in_batch=num_items_in_batch, vllm_is_ratio=vllm_is_ratio,
                               entropies=entropies, sampling_logps=sampling_per_token_logps)
    return out.loss, loss_metrics(out)
