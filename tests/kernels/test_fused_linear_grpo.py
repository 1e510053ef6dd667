"""fused_linear_grpo_loss (Triton under the interpreter, and the chunked CPU path) against the
float64 reference: loss, every gradient and the metrics, over loss types, IS levels and edge cases."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastebm.grpo.loss import compute_grpo_loss
from fastebm.kernels import GRPOLossOptions, fused_linear_grpo_loss, fused_linear_grpo_loss_ref, linear_logprobs

from kernel_helpers import BACKENDS, DEVICE, assert_3way, make_batch

CONFIGS = {
    "grpo_token_kl_T07": dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.7, loss_type="grpo"),
    "bnpo_beta0_no_old": dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="bnpo", _old=False, _ref=False),
    "dr_grpo_delta": dict(beta=0.1, epsilon_low=0.1, epsilon_high=0.3, loss_type="dr_grpo",
                          max_completion_length=12, delta=1.2, temperature=1.3),
    "dapo_sequence": dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo",
                          importance_sampling_level="sequence", num_items_in_batch=37.0),
    "zero_adv": dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", _adv_zero=True),
    "vllm_is_ratio": dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo", _vllm=True),
}


def _run(fn, batch, cfg, dtype, **extra):
    kw = {k: v for k, v in cfg.items() if not k.startswith("_")}
    h = batch["hidden"].detach().clone().requires_grad_()
    w = batch["weight"].detach().clone().requires_grad_()
    if cfg.get("_vllm"):
        kw["vllm_is_ratio"] = torch.linspace(0.5, 1.5, h.shape[0] * h.shape[1], device=h.device).view(h.shape[:2])
    loss, metrics = fn(h, w, batch["ids"], batch["mask"], batch["adv"], batch["old"], batch["ref"], **kw, **extra)
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


def _batch(cfg, dtype, shape, seed=0):
    return make_batch(*shape, dtype=dtype, seed=seed, old=cfg.get("_old", True), ref=cfg.get("_ref", True),
                      adv_zero=cfg.get("_adv_zero", False))


def _check_all(batch, cfg, dtype, backend):
    out = _run(fused_linear_grpo_loss, batch, cfg, dtype, backend=backend)
    ref64 = _run(fused_linear_grpo_loss_ref, batch, cfg, dtype, upcast=True)
    lowp = _run(fused_linear_grpo_loss_ref, batch, cfg, dtype)
    for i, name in enumerate(["loss", "d_hidden", "d_weight"]):
        assert torch.isfinite(out[i]).all(), name
        assert out[i].dtype == (torch.float32 if name == "loss" else dtype), name
        assert_3way(out[i], ref64[i], lowp[i], dtype, name)
    lp = out[3]["per_token_logps"]
    assert lp.dtype == torch.float32 and lp.shape == batch["ids"].shape
    assert_3way(lp, ref64[3]["per_token_logps"], lowp[3]["per_token_logps"], dtype, "logps")
    assert_3way(out[3]["kl"], ref64[3]["kl"], lowp[3]["kl"], dtype, "kl")
    # Clip decisions are discrete: allow the kernel to differ from float64 by as many tokens as
    # PyTorch's own low-precision path does (twice), never more.
    n_tok = batch["mask"].sum().item()
    assert_3way(out[3]["clip_ratio"], ref64[3]["clip_ratio"], lowp[3]["clip_ratio"], dtype, "clip_ratio",
                atol=1e-6)
    assert abs(out[3]["clip_ratio"].item() - ref64[3]["clip_ratio"].item()) * n_tok < 2.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_matches_float64_reference(backend, dtype, cfg_name, small_tiles):
    # V = 1000 + 37 and H = 40 are multiples of no tile; T = 7 is not a multiple of BLOCK_M.
    cfg = CONFIGS[cfg_name]
    _check_all(_batch(cfg, dtype, (3, 7, 40, 1037)), cfg, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs(backend, small_tiles):
    cfg = CONFIGS["grpo_token_kl_T07"]
    _check_all(_batch(cfg, torch.float16, (2, 5, 32, 531), seed=3), cfg, torch.float16, backend)


def test_clip_ratio_is_exercised():
    # Guard the fixture itself: the ratios must straddle the clip range or clip tests prove nothing.
    cfg = CONFIGS["grpo_token_kl_T07"]
    _, _, _, m = _run(fused_linear_grpo_loss_ref, _batch(cfg, torch.float32, (3, 7, 40, 1037)), cfg, torch.float32)
    assert 0.05 < m["clip_ratio"].item() < 0.95


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_gives_zero_loss_and_grads(backend, small_tiles):
    b = make_batch(2, 5, 24, 300)
    b["mask"].zero_()
    loss, dh, dw, m = _run(fused_linear_grpo_loss, b, CONFIGS["grpo_token_kl_T07"], torch.float32, backend=backend)
    assert loss.item() == 0.0 and m["kl"].item() == 0.0 and m["clip_ratio"].item() == 0.0
    assert dh.abs().max().item() == 0.0 and dw.abs().max().item() == 0.0


@pytest.mark.parametrize("tile_v", [1024, 4096])
def test_qwen_vocabulary_remainder_triton(tile_v, monkeypatch):
    # The real Qwen2-VL vocabulary, 152064, is not a multiple of 1024 (remainder 512) or 4096:
    # the tail tile must be masked in the forward and the backward. Ids at both ends of the vocab.
    from fastebm.kernels import fused_linear_logprobs as ll

    monkeypatch.setattr(ll, "TILES_INTERPRET", dict(fwd_m=16, fwd_v=tile_v, fwd_k=16, bwd_m=16, bwd_v=tile_v,
                                                    bwd_k=16, dz_m=16, dz_v=tile_v, dz_k=16, num_warps=4,
                                                    num_stages=1))
    monkeypatch.setattr(ll, "PANEL_INTERPRET", (16, 8 * tile_v))   # "gemm" panels of whole tiles, the last ragged
    V = 152064
    b = make_batch(1, 4, 16, V, seed=5, masked_row=False)
    b["ids"] = torch.tensor([[0, V - 1, V - 300, 151999]], device=DEVICE)
    cfg = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo", temperature=0.9)
    out = _run(fused_linear_grpo_loss, b, cfg, torch.float32, backend="triton")
    ref = _run(fused_linear_grpo_loss_ref, b, cfg, torch.float32, upcast=True)
    low = _run(fused_linear_grpo_loss_ref, b, cfg, torch.float32)
    for i, name in enumerate(["loss", "d_hidden", "d_weight"]):
        assert_3way(out[i], ref[i], low[i], torch.float32, name)
    # the tail rows of d weight (beyond the last full tile) are where a missing mask would show
    tail = slice(V - V % tile_v, V)
    assert_3way(out[2][tail], ref[2][tail], low[2][tail], torch.float32, "d_weight tail")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_and_frozen_weight(backend, small_tiles):
    b = make_batch(2, 6, 24, 333, seed=7, masked_row=False)
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone()                    # frozen lm_head (LoRA-style): no weight gradient
    bias = (0.3 * torch.randn(333)).to(DEVICE).requires_grad_()
    lp = linear_logprobs(h, w, b["ids"], 0.8, bias=bias, backend=backend)
    (lp * b["mask"]).sum().backward()
    h64 = b["hidden"].double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_()
    ref = torch.log_softmax((h64 @ w.double().t() + bias64) / 0.8, -1).gather(-1, b["ids"][..., None]).squeeze(-1)
    (ref * b["mask"]).sum().backward()
    assert (lp.double() - ref).abs().max() < 1e-5
    assert (h.grad.double() - h64.grad).abs().max() < 1e-5
    assert (bias.grad.double() - bias64.grad).abs().max() < 1e-5


def test_compute_grpo_loss_front_end_fused_matches_reference():
    b = make_batch(2, 6, 32, 500, seed=11)
    options = GRPOLossOptions(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.9, loss_type="grpo")
    outs = {}
    for kernel in ("fused", "eager"):
        h = b["hidden"].clone().requires_grad_()
        w = b["weight"].clone().requires_grad_()
        o = compute_grpo_loss(h, w, b["ids"], b["mask"], b["adv"], b["old"], b["ref"], options, kernel=kernel)
        o.loss.backward()
        outs[kernel] = (o.loss.detach(), h.grad, w.grad, o.per_token_logps, o.kl, o.clip_ratio)
    for a, r in zip(outs["fused"], outs["eager"]):
        torch.testing.assert_close(a.float(), r.float(), atol=2e-5, rtol=1e-4)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("strategy", ["gemm", "atomic", "sparse"])
def test_cpu_path_never_materialises_full_logits(strategy, monkeypatch):
    # Force several token AND vocabulary chunks (panels for "gemm"); the largest tensor any op makes
    # in forward and backward must be a chunk, far below N x V (the weight gradient (V, H) is the
    # legit maximum).
    from fastebm.kernels import fused_linear_logprobs as ll

    monkeypatch.setattr(ll, "CHUNK_TOKENS", 8)
    monkeypatch.setattr(ll, "CHUNK_ELEMS", 8 * 128)
    monkeypatch.setattr(ll, "PANEL_CPU", (8, 128))
    B, T, H, V = 2, 20, 8, 1000
    b = make_batch(B, T, H, V, seed=2)
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    cfg = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo")
    with _LargestTensor() as probe:
        loss, _ = fused_linear_grpo_loss(h, w, b["ids"], b["mask"], b["adv"], b["old"], b["ref"],
                                         backend="torch", backward=strategy, **cfg)
        loss.backward()
    assert probe.largest <= max(V * H, 8 * 128), probe.largest
    assert probe.largest < B * T * V
    ref, _ = fused_linear_grpo_loss_ref(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], b["old"],
                                        b["ref"], upcast=True, **cfg)
    assert abs(loss.item() - ref.item()) < 1e-5


def test_rejects_bad_inputs():
    b = make_batch(2, 3, 8, 50)
    kw = dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.2)
    with pytest.raises(ValueError, match="loss_type"):
        fused_linear_grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], loss_type="ppo", **kw)
    with pytest.raises(ValueError, match="max_completion_length"):
        fused_linear_grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], loss_type="dr_grpo", **kw)
    with pytest.raises(ValueError, match="advantages"):
        fused_linear_grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"][:1], **kw)
    with pytest.raises(ValueError, match="reference log-probs"):
        fused_linear_grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"],
                               beta=0.1, epsilon_low=0.2, epsilon_high=0.2)
