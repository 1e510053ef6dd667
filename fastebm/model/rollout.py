"""Group sampling on the repeated path (``rollout.shared_prefix = false``): G completions per prompt.

Hugging Face ``generate`` with ``num_return_sequences=G`` (greedy: a batch of G copies, which
``generate`` needs there), one prompt at a time: the prefix runs once per sample, as in the
reference implementation. ``fastebm.model.decode.shared_prefix_rollout`` is the fast path with the
same contract: ``rollout(model, tokenizer, prompts, cfg) -> RolloutResult``.

Sampling is ``rollout.temperature``, then ``rollout.top_k``, then ``rollout.top_p`` (transformers'
warper order), with the vision placeholders suppressed, and nothing else: every setting that shapes
the distribution is passed explicitly (``sampling_config``) and the checkpoint's own
``generation_config.json`` is set aside for the call (transformers would fill any setting left unset
from it, e.g. Qwen2-VL's top_k=1 and repetition_penalty=1.05, then from its defaults, e.g. top_k=50).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastebm.model.forward import Prompt, video_inputs


@dataclass
class RolloutResult:
    completion_ids: list[list[int]]   # prompt-major: G per prompt; EOS included when produced
    prompt_index: list[int]           # the prompt of each completion
    texts: list[str]                  # decoded completions, special tokens dropped
    truncated: list[bool]             # True where max_new_tokens was hit before EOS
    prefill_tokens: int               # prompt tokens run through the model (metrics)
    logprobs: Optional[list[list[float]]] = None  # sampled tokens' log-probs, where the rollout has them


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")


def _repeat(key: str, x: torch.Tensor, G: int) -> torch.Tensor:
    """G copies along the batch: per-token inputs (1, L) -> (G, L); per-video ones (pixel patches,
    grid rows, seconds per grid) concatenated G times."""
    return x.expand(G, -1).contiguous() if key in _PER_TOKEN else torch.cat([x] * G)


def _generate(model, inputs: dict, G: int, greedy: bool, gen_config) -> torch.Tensor:
    """G sequences for one prompt: ``num_return_sequences=G``, or, greedy (which ``generate``
    refuses to repeat), a batch of G copies (``gen_config`` then returns one sequence per row)."""
    with _own_generation_config(model):
        if greedy:
            return model.generate(**{k: _repeat(k, v, G) for k, v in inputs.items()}, generation_config=gen_config)
        return model.generate(**inputs, generation_config=gen_config)


def sampling_config(cfg, stops: list[int], pad: int, suppress: list[int], num_return_sequences: int):
    """The GenerationConfig of a rollout (``cfg``: the ``[rollout]`` section): temperature, top-k (0: off),
    top-p (1: off), and every other distribution-shaping setting at its neutral value."""
    from transformers import GenerationConfig

    greedy = cfg.temperature == 0
    common = dict(max_new_tokens=cfg.max_new_tokens, eos_token_id=stops, pad_token_id=pad, suppress_tokens=suppress,
                  num_beams=1, num_return_sequences=num_return_sequences, repetition_penalty=1.0,
                  no_repeat_ngram_size=0, renormalize_logits=False)
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, **common)


@contextlib.contextmanager
def _own_generation_config(model):
    """Set the checkpoint's generation_config aside while generating (transformers fills unset settings
    from it); a fresh default one stands in."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def suppressed_ids(model) -> list[int]:
    """Vision placeholders: a completion must never contain them (the forward would take them for
    another video); a random or young policy does sample them, so rollouts mask them out."""
    c = model.config
    return [i for i in (c.video_token_id, c.image_token_id, c.vision_start_token_id, c.vision_end_token_id)
            if i is not None]


@torch.no_grad()
def rollout(model, tokenizer, prompts: Sequence[Prompt], cfg, seeds: Optional[Sequence[int]] = None) -> RolloutResult:
    """Sample ``cfg.group_size`` completions for each prompt (``cfg``: the ``[rollout]`` section).

    ``seeds``: one sampling seed per prompt (torch's global generator is reseeded per prompt and
    restored afterwards); default: the global generator as it is.
    """
    device = next(model.parameters()).device
    G, greedy = cfg.group_size, cfg.temperature == 0
    stops = eos_ids(model, tokenizer)  # read before the checkpoint's generation_config is set aside
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    gen_config = sampling_config(cfg, stops, pad, suppressed_ids(model), 1 if greedy else G)
    was_training = model.training
    model.eval()
    comps, index, truncated, prefill = [], [], [], 0
    try:
        for p_i, prompt in enumerate(prompts):
            input_ids = torch.tensor([prompt.ids], device=device)
            vids = video_inputs([prompt.video], device)
            inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          pixel_values_videos=vids["pixel_values_videos"].to(model.dtype),
                          video_grid_thw=vids["video_grid_thw"],
                          mm_token_type_ids=(input_ids == model.config.video_token_id).to(torch.int32) * 2)
            if model.config.model_type == "qwen2_5_vl":
                inputs["second_per_grid_ts"] = vids["second_per_grid_ts"]
            rng = contextlib.nullcontext()
            if seeds is not None:
                rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
            with rng:
                if seeds is not None:
                    torch.manual_seed(int(seeds[p_i]))
                out = _generate(model, inputs, G, greedy, gen_config)
            prefill += len(prompt.ids) * G  # the repeated path runs the prefix for every sample
            new = out[:, input_ids.shape[1]:].tolist()
            for seq in new:
                cut = next((j for j, t in enumerate(seq) if t in stops), None)
                if cut is None:  # hit max_new_tokens: no EOS, hence no padding either
                    comps.append(seq)
                    truncated.append(True)
                else:
                    comps.append(seq[:cut + 1])
                    truncated.append(False)
                index.append(p_i)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
    return RolloutResult(comps, index, texts, truncated, prefill)
