"""Shared helpers for the kernel tests (imported as a plain module: tests/ has no packages).

The tolerance rule (STYLE.md): against the float64 reference, the kernel's error may be at most
twice PyTorch's own error at the input precision, plus a small atol -- for the output and every
gradient. Triton runs under TRITON_INTERPRET=1 here (tests/conftest.py sets it on CPU machines);
``backend="triton"`` forces the kernels, ``backend="torch"`` the chunked CPU path.

Device-generic: ``DEVICE`` is the machine's ("cuda" where a GPU is visible, else "cpu"), and
``make_batch`` builds its tensors there, so the same tests run the interpreter on a CPU and the
compiled kernels on CUDA tensors with the GPU's own dtypes (bf16 dots without widening:
``UPCAST_DOT`` is set only under the interpreter).
"""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["triton", "torch"]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3, torch.float64: 1e-10}


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_3way(out, ref64, torch_lowp, dtype, name="", atol=None):
    """max |out - ref64| <= 2 * max |torch_lowp - ref64| + atol, with a scale-aware atol."""
    scale = max(1.0, ref64.double().abs().max().item() if ref64.numel() else 1.0)
    a = (ATOL[dtype] if atol is None else atol) * scale
    e_k, e_t = err(out, ref64), err(torch_lowp, ref64)
    assert e_k <= 2 * e_t + a, f"{name}: kernel err {e_k:.3e} > 2 * torch err {e_t:.3e} + {a:.1e}"


def make_batch(B, T, H, V, dtype=torch.float32, seed=0, old=True, ref=True, masked_row=True,
               adv_zero=False, w_scale=None):
    """Hidden (B, T, H), weight (V, H), ids, a ragged mask (one fully masked row when B > 1),
    advantages and old/ref log-probs near the policy's own (so ratios straddle the clip range)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (w_scale if w_scale is not None else 2.0 / H ** 0.5)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    for b in range(B):
        mask[b, max(1, T - b * 3):] = 0
    if masked_row and B > 1:
        mask[-1] = 0
    adv = torch.zeros(B) if adv_zero else torch.randn(B, generator=g)
    with torch.no_grad():
        base = torch.log_softmax((hidden @ weight.t()).double(), -1).gather(-1, ids[..., None]).squeeze(-1).float()
    old_lp = (base + 0.3 * torch.randn(B, T, generator=g)) if old else None
    ref_lp = (base + 0.3 * torch.randn(B, T, generator=g)) if ref else None
    d = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), ids=ids, mask=mask, adv=adv, old=old_lp, ref=ref_lp)
    return {k: v.to(DEVICE) if v is not None else None for k, v in d.items()}




def trl_compute_loss(hidden, weight, ids, mask, adv, old, ref, options, *, num_items_in_batch=None,
                     vllm_is_ratio=None, sampling_logps=None):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` on one process, its log-probs (and entropies)
    from full logits of ``hidden @ weight.T / temperature`` in the inputs' dtype: the plain-torch
    reference of the loss semantics, independent of fastebm's code. The trainer attributes it reads
    are set from ``options`` (a GRPOLossOptions); the accelerator is the one-process identity.

    Returns (loss, d hidden, d weight, TRL's logged metrics {name: value}).
    """
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    o = options
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        logprobs = torch.log_softmax((h @ w.t()) / o.temperature, -1)
        lp = logprobs.gather(-1, ids[..., None]).squeeze(-1)
        return lp, -(logprobs.exp() * logprobs).sum(-1).detach(), None

    acc = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                          reduce=lambda x, reduction="sum": x, sync_gradients=True,
                          pad_across_processes=lambda x, dim=0, pad_index=0: x)
    args = SimpleNamespace(use_bias_correction_kl=o.use_bias_correction_kl, delta=o.delta, steps_per_generation=1,
                           sapo_temperature_pos=o.sapo_temperature_pos, sapo_temperature_neg=o.sapo_temperature_neg,
                           vespo_k_pos=o.vespo_k_pos, vespo_lambda_pos=o.vespo_lambda_pos,
                           vespo_k_neg=o.vespo_k_neg, vespo_lambda_neg=o.vespo_lambda_neg)
    stub = SimpleNamespace(
        loss_type=o.loss_type, importance_sampling_level=o.importance_sampling_level, beta=o.beta,
        epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high, max_completion_length=o.max_completion_length,
        args=args, accelerator=acc, model=SimpleNamespace(training=True),
        top_entropy_quantile=o.top_entropy_quantile, off_policy_mask_threshold=o.off_policy_mask_threshold,
        use_vllm=vllm_is_ratio is not None, vllm_importance_sampling_correction=vllm_is_ratio is not None,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)}, get_gamma_weights=GRPOTrainer.get_gamma_weights,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies)
    stub.get_high_entropy_mask = lambda e, m, t: GRPOTrainer.get_high_entropy_mask(stub, e, m, t)
    B = ids.shape[0]
    if num_items_in_batch is None:
        num_items_in_batch = mask.sum()
    inputs = dict(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2),
                  completion_ids=ids, completion_mask=mask, advantages=adv,
                  num_items_in_batch=torch.as_tensor(num_items_in_batch, dtype=torch.float64))
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    if vllm_is_ratio is not None:
        inputs["importance_sampling_ratio"] = vllm_is_ratio
    if sampling_logps is not None:
        inputs["sampling_per_token_logps"] = sampling_logps
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.detach(), h.grad, w.grad, {k: v[-1] for k, v in stub._metrics["train"].items()}
