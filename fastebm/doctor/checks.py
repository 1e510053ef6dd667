"""``fastebm doctor``'s self-checks: every fast path on this machine's device against its reference,
at small shapes, each reported as pass / fail / skipped (with the reason), its worst error against
the bound it must meet, and its time.

The bound is the kernels' test rule (STYLE.md): the fast path's error against the float64 reference
may be at most twice PyTorch's own error at the input precision, plus a small atol. On a GPU the
Triton kernels run natively (bf16 inputs); on a CPU the fast path is the chunked PyTorch path, and
the Triton kernels are also checked under the interpreter when ``TRITON_INTERPRET=1`` was set before
Triton was imported (``fastebm doctor`` does so on a machine without CUDA).
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


class Skip(Exception):
    """A check that cannot run here; the message is the reason (e.g. the missing package)."""


@dataclass
class CheckResult:
    name: str
    status: str                 # pass | fail | skipped
    worst: str = ""             # "<worst error> <= <bound>" of the worst output
    seconds: float = 0.0
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def run_check(name: str, fn: Callable[[], list]) -> CheckResult:
    """``fn() -> [(label, error, bound), ...]``; passes when every error is within its bound."""
    t0 = time.perf_counter()
    try:
        errs = fn()
    except Skip as e:
        return CheckResult(name, "skipped", seconds=time.perf_counter() - t0, detail=str(e))
    except Exception as e:  # a crash of a fast path is a failed check, reported with its cause
        return CheckResult(name, "fail", seconds=time.perf_counter() - t0,
                           detail=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
    dt = time.perf_counter() - t0
    bad = [(lbl, e, b) for lbl, e, b in errs if not e <= b]
    worst_lbl, worst_e, worst_b = max(errs, key=lambda x: x[1] / max(x[2], 1e-30))
    worst = f"{worst_lbl}: {worst_e:.2e} <= {worst_b:.2e}"
    if bad:
        return CheckResult(name, "fail", worst, dt, "; ".join(f"{l}: {e:.3e} > {b:.3e}" for l, e, b in bad))
    return CheckResult(name, "pass", worst, dt)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def three_way(label, out, ref64, lowp, dtype, atol=None):
    """(label, kernel error, bound) with bound = 2 x PyTorch's low-precision error + a scale-aware atol."""
    scale = max(1.0, ref64.double().abs().max().item() if ref64.numel() else 1.0)
    return (label, _err(out, ref64), 2 * _err(lowp, ref64) + (ATOL[dtype] if atol is None else atol) * scale)


def _batch(device, dtype, B=2, T=7, H=40, V=531, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[-1, T - 3:] = 0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        base = torch.log_softmax((hidden @ weight.t()).double(), -1).gather(-1, ids[..., None]).squeeze(-1).float()
    old = base + 0.3 * torch.randn(B, T, generator=g)
    ref = base + 0.3 * torch.randn(B, T, generator=g)
    d = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), ids=ids, mask=mask, adv=adv, old=old, ref=ref)
    return {k: v.to(device) for k, v in d.items()}


def _backends(device) -> list[str]:
    from fastebm.kernels._backend import triton_interpreted

    if device.type == "cuda":
        return ["triton", "torch"]
    return ["torch"] + (["triton"] if triton_interpreted() else [])


def _label(backend, device) -> str:
    if backend == "triton":
        return "triton" if device.type == "cuda" else "triton, interpreter"
    return "torch path"


# --------------------------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------------------------- #


def check_fused_loss(device, dtype, backend, strategy):
    from fastebm.kernels import fused_linear_grpo_loss, fused_linear_grpo_loss_ref

    b = _batch(device, dtype)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.8, loss_type="dapo")

    def run(fn, **extra):
        h = b["hidden"].clone().requires_grad_()
        w = b["weight"].clone().requires_grad_()
        loss, m = fn(h, w, b["ids"], b["mask"], b["adv"], b["old"], b["ref"], **kw, **extra)
        loss.backward()
        return loss.detach(), h.grad, w.grad, m["per_token_logps"]

    out = run(fused_linear_grpo_loss, backend=backend, backward=strategy)
    ref = run(fused_linear_grpo_loss_ref, upcast=True)
    low = run(fused_linear_grpo_loss_ref)
    return [three_way(n, o, r, lo, dtype) for n, o, r, lo in zip(["loss", "d_hidden", "d_weight", "logps"], out, ref, low)]


def check_token_logprobs(device, dtype, backend):
    from fastebm.kernels import token_logprobs, token_logprobs_ref

    b = _batch(device, dtype, seed=1)
    out = token_logprobs(b["hidden"], b["weight"], b["ids"], 0.8, return_entropy=True, backend=backend)
    ref = token_logprobs_ref(b["hidden"], b["weight"], b["ids"], 0.8, return_entropy=True, upcast=True)
    low = token_logprobs_ref(b["hidden"], b["weight"], b["ids"], 0.8, return_entropy=True)
    return [three_way(n, o, r, lo, dtype) for n, o, r, lo in zip(["logp", "entropy"], out, ref, low)]


def check_logits_loss(device, dtype, backend):
    from fastebm.kernels import grpo_loss, grpo_loss_ref

    b = _batch(device, torch.float32, seed=2)
    with torch.no_grad():
        logits = (b["hidden"] @ b["weight"].t()).to(dtype)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.7, loss_type="grpo")

    def run(fn, **extra):
        x = logits.clone().requires_grad_()
        loss, _ = fn(x, b["ids"], b["mask"], b["adv"], b["old"], b["ref"], **kw, **extra)
        loss.backward()
        return loss.detach(), x.grad

    out, ref, low = run(grpo_loss, backend=backend), run(grpo_loss_ref, upcast=True), run(grpo_loss_ref)
    return [three_way(n, o, r, lo, dtype) for n, o, r, lo in zip(["loss", "d_logits"], out, ref, low)]


def check_group_advantages(device, backend):
    from fastebm.kernels import group_advantages, group_advantages_ref

    g = torch.Generator().manual_seed(3)
    rewards = {n: (torch.randn(16, generator=g) * (i + 1)).to(device) for i, n in enumerate(["a", "b", "c"])}
    weights = {"a": 1.0, "b": 1.0, "c": 0.8}
    out = group_advantages(rewards, weights, 8, "per_reward", backend=backend)
    ref = group_advantages_ref(rewards, weights, 8, "per_reward")
    return [("advantages", _err(out, ref), 1e-5 * max(1.0, ref.abs().max().item()))]


def check_cascade_attention(device, dtype, backend):
    from fastebm.kernels.cascade_attention import cascade_attention, cascade_attention_ref

    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    B, G, Hq, Hkv, D, T = 2, 4, 4, 2, 32, 7
    lens = [45, 30]
    args = (r(B * G, Hq, D), r(B, Hkv, max(lens), D), r(B, Hkv, max(lens), D), lens, r(B * G, Hkv, T, D),
            r(B * G, Hkv, T, D))
    out = cascade_attention(*args, 6, backend=backend)
    return [three_way("output", out, cascade_attention_ref(*args, 6, upcast=True), cascade_attention_ref(*args, 6),
                      dtype)]


def check_packed_attention(device, dtype):
    from fastebm.model.packed_attention import RowLayout, packed_attention_forward

    class _Attn(torch.nn.Module):
        num_key_value_groups = 3

    H, Hkv, D, P, lengths = 6, 2, 8, 7, [3, 5, 1]
    L = P + sum(lengths) + 2
    g = torch.Generator().manual_seed(5)
    q0, k0, v0 = (torch.randn(1, h, L, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    m = torch.zeros(L, L, dtype=torch.bool)
    m[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
    s = P
    for n in lengths:
        m[s:s + n, :P] = True
        m[s:s + n, s:s + n] = torch.ones(n, n, dtype=torch.bool).tril()
        s += n
    for i in range(s, L):
        m[i, i] = True

    def dense(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), attn_mask=m.to(q.device),
            scale=0.3).transpose(1, 2)[:, :s]

    def packed(q, k, v):
        lay = [RowLayout.build(P, lengths, q.device)]
        return packed_attention_forward(_Attn(), q, k, v, None, scaling=0.3, fastebm_packed=lay)[0][:, :s]

    def run(fn, dt):
        q, k, v = (x.to(device, dt).requires_grad_() for x in (q0, k0, v0))
        out = fn(q, k, v)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        return [out.detach(), *grads]

    out, ref, low = run(packed, dtype), run(dense, torch.float64), run(dense, dtype)
    return [three_way(n, o, r, lo, dtype) for n, o, r, lo in zip(["output", "d_q", "d_k", "d_v"], out, ref, low)]


# --------------------------------------------------------------------------------------------- #
# Video backends
# --------------------------------------------------------------------------------------------- #


def check_video(backend: str, codec: str, gpu: bool):
    """Decode a synthetic clip whose frames carry their own index as a bar code; every returned frame
    must be the one asked for. DALI is also compared with PyAV pixel by pixel (mean |difference|)."""
    from fastebm.data.synth import read_frame_code, write_synthetic_clip
    from fastebm.data.video import dali_backend, pyav_backend

    if backend == "dali":
        if not dali_backend.available():
            raise Skip("nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
        if gpu and not torch.cuda.is_available():
            raise Skip("DALI GPU decoding needs a CUDA GPU")
        if not dali_backend.can_decode(codec, gpu):
            raise Skip(dali_backend.codec_reason(codec, gpu))
    with tempfile.TemporaryDirectory() as d:
        path = write_synthetic_clip(os.path.join(d, f"clip.{'webm' if codec == 'vp9' else 'mp4'}"), codec=codec,
                                    width=160, height=96, num_frames=20, fps=10)
        info = pyav_backend.probe(path)
        indices = [0, 3, 9, 14, 19]
        ref = pyav_backend.decode_frames(path, info, indices)
        frames = ref if backend == "pyav" else dali_backend.decode_frames(path, info, indices, gpu=gpu)
        codes = [read_frame_code(f.cpu().numpy()) for f in frames]
        out = [("wrong frames", float(sum(c != i for c, i in zip(codes, indices))), 0.0)]
        if backend == "dali":
            out.append(("mean |DALI - PyAV|", (frames.cpu().float() - ref.float()).abs().mean().item(), 8.0))
        return out


# --------------------------------------------------------------------------------------------- #
# The list
# --------------------------------------------------------------------------------------------- #


def kernel_checks(device: torch.device) -> list[tuple[str, Callable]]:
    from fastebm.kernels import BACKWARD_STRATEGIES

    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    out = []
    for backend in _backends(device):
        lbl = _label(backend, device)
        for dt in dtypes:
            tag = f"{lbl}, {str(dt).replace('torch.', '')}"
            for s in BACKWARD_STRATEGIES:
                out.append((f"fused GRPO loss + gradients, backward={s} ({tag})",
                            lambda b=backend, dt=dt, s=s: check_fused_loss(device, dt, b, s)))
            out.append((f"token log-probs + entropy ({tag})", lambda b=backend, dt=dt: check_token_logprobs(device, dt, b)))
            out.append((f"logits GRPO loss ({tag})", lambda b=backend, dt=dt: check_logits_loss(device, dt, b)))
            out.append((f"cascade attention ({tag})", lambda b=backend, dt=dt: check_cascade_attention(device, dt, b)))
        out.append((f"group advantages ({lbl})", lambda b=backend: check_group_advantages(device, b)))
    for dt in dtypes:
        out.append((f"packed attention (SDPA, {str(dt).replace('torch.', '')})",
                    lambda dt=dt: check_packed_attention(device, dt)))
    return out


def video_checks() -> list[tuple[str, Callable]]:
    return [("video: PyAV, H.264", lambda: check_video("pyav", "h264", False)),
            ("video: PyAV, VP9", lambda: check_video("pyav", "vp9", False)),
            ("video: DALI CPU, VP9", lambda: check_video("dali", "vp9", False)),
            ("video: DALI GPU (NVDEC), H.264", lambda: check_video("dali", "h264", True))]


def self_checks(device: Optional[torch.device] = None, recipe: Optional[str] = None,
                overrides: Optional[list[str]] = None) -> list[CheckResult]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checks = kernel_checks(device) + video_checks()
    if recipe:
        from fastebm.doctor.recipe import recipe_checks

        checks += recipe_checks(recipe, device, overrides or [])
    return [run_check(name, fn) for name, fn in checks]


def format_checks(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        what = r.worst if r.status != "skipped" else f"skipped: {r.detail}"
        if r.status == "fail":
            what = f"{r.worst}  {r.detail.splitlines()[0] if r.detail else ''}".strip()
        lines.append(f"{r.status.upper():<7} {r.name:<{width}}  {r.seconds:6.2f}s  {what}")
    return "\n".join(lines)
