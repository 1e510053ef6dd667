"""Token log-probabilities of completions under a model, from hidden states and the lm_head weight.

Two contracts, two names:

- ``scoring_logprobs``: no gradient; the old-policy, reference and teacher passes.
- ``training_logprobs``: differentiable in the hidden states and the weight; the SFT loss.

``suffix_logprobs`` runs the model itself: the log-probs of token sequences after prompts (the
old-policy and reference passes of GRPO, the teacher requests of rewards), one forward per prompt
group on the shared prefix.

``kernel`` is ``grpo.kernel``: ``"fused"`` runs ``fastebm.kernels`` (Triton on CUDA, a token x
vocabulary chunked PyTorch path elsewhere), ``"eager"`` plain PyTorch with token-chunked logits.
Either way the full (tokens x vocabulary) logits never exist at once. Log-probs are fp32, (B, T).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from fastebm.kernels import linear_logprobs, token_logprobs
from fastebm.kernels.fused_linear_logprobs import eager_token_logprobs
from fastebm.model.forward import Prompt, completion_hidden_states, lm_head_weight
from fastebm.model.prefix import pack_groups, shared_prefix_hidden_states

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


@dataclass
class SuffixScores:
    """Log-probs of token sequences scored after prompts (``suffix_logprobs``)."""
    logprobs: list[torch.Tensor]   # per suffix: (len(suffix),) fp32, on the model's device
    prefix_tokens: int             # prompt tokens run through the model (metrics)


@torch.no_grad()
def suffix_logprobs(model, prompts: Sequence[Prompt], suffixes: Sequence[Sequence[int]], prompt_index: Sequence[int],
                    temperature: Union[float, Sequence[float]] = 1.0, *, kernel: str = "fused",
                    shared_prefix: bool = True, batch_size: int = 0, pad_id: int = 0) -> SuffixScores:
    """Per-token log-probs of every ``suffixes[i]`` after ``prompts[prompt_index[i]]``, without gradient.

    One forward per prompt group (``batch_size = 0``: all suffixes of a prompt together; with
    ``shared_prefix`` one packed row that runs the prompt's video + text prefix once), or per
    ``batch_size`` consecutive suffixes. ``temperature``: one value, or one per suffix (the KL
    completions at the rollout temperature and teacher sequences at 1 share a forward).
    """
    _check(kernel)
    n = len(suffixes)
    temps = [float(temperature)] * n if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    if len(temps) != n or len(prompt_index) != n:
        raise ValueError(f"{n} suffixes but {len(prompt_index)} prompt indices and {len(temps)} temperatures")
    if batch_size > 0:
        chunks = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    else:
        chunks = [members for _, members in pack_groups(prompt_index)]
    forward = shared_prefix_hidden_states if shared_prefix else completion_hidden_states
    out: list = [None] * n
    prefix = 0
    for idx in chunks:
        cb = forward(model, prompts, [suffixes[i] for i in idx], [prompt_index[i] for i in idx], pad_id=pad_id)
        weight = lm_head_weight(model)  # read after the forward: under FSDP the root unit is gathered by then
        for t in sorted({temps[i] for i in idx}):
            rows = [j for j, i in enumerate(idx) if temps[i] == t]
            sel = torch.tensor(rows, device=cb.hidden.device)
            lp = scoring_logprobs(cb.hidden.index_select(0, sel), weight, cb.ids.index_select(0, sel), t, kernel)
            for r, j in enumerate(rows):
                out[idx[j]] = lp[r, :len(suffixes[idx[j]])]
        prefix += cb.num_prompt_tokens
    return SuffixScores(out, prefix)


def pad_rows(rows: Sequence[torch.Tensor], device=None) -> torch.Tensor:
    """Per-sequence 1-D log-probs -> (N, Tmax) fp32, zero-padded on the right."""
    out = torch.zeros((len(rows), max([1] + [len(r) for r in rows])), dtype=torch.float32, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.float32, device=device)
    return out
