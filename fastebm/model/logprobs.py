"""Token log-probabilities of completions under a model, from hidden states and the lm_head weight.

Two contracts, two names:

- ``scoring_logprobs``: no gradient; the old-policy, reference and teacher passes.
- ``training_logprobs``: differentiable in the hidden states and the weight; the SFT loss.

``kernel`` is ``grpo.kernel``: ``"fused"`` runs ``fastebm.kernels`` (Triton on CUDA, a token x
vocabulary chunked PyTorch path elsewhere), ``"eager"`` plain PyTorch with token-chunked logits.
Either way the full (tokens x vocabulary) logits never exist at once. Log-probs are fp32, (B, T).
"""
from __future__ import annotations

import torch

from fastebm.kernels import linear_logprobs, token_logprobs
from fastebm.kernels.fused_linear_logprobs import eager_token_logprobs

KERNELS = ("fused", "eager")


def _check(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"grpo.kernel must be one of {KERNELS}, got {kernel!r}")


@torch.no_grad()
def scoring_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                     kernel: str = "fused") -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[token_ids], fp32 (B, T), without gradient."""
    _check(kernel)
    if kernel == "fused":
        return token_logprobs(hidden, weight, token_ids, temperature)
    return eager_token_logprobs(hidden, weight, token_ids, temperature)


def training_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                      kernel: str = "fused") -> torch.Tensor:
    """The same log-probs, differentiable in ``hidden`` and ``weight`` (the backward recomputes the logits)."""
    _check(kernel)
    if kernel == "fused":
        return linear_logprobs(hidden, weight, token_ids, temperature)
    return eager_token_logprobs(hidden, weight, token_ids, temperature)
