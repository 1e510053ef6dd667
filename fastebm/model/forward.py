"""Forward passes over [prompt; completion] sequences, returning completion hidden states.

Every pass (old log-probs, reference log-probs, the training forward) goes through
``completion_hidden_states``: it packs the sequences with right padding, computes M-RoPE positions
with ``mrope_positions`` (the one function all passes share), runs the decoder *without* the
lm_head, and gathers the hidden state that predicts each completion token. The loss and the
scoring kernels multiply by the lm_head weight themselves, so full logits never exist.

This is the *repeated-prefix* path: each sequence carries its own copy of the prompt and video.
The shared-prefix forward replaces it behind the same signature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass
class Prompt:
    """One prompt: its token ids and its video (a fastebm.data.video.VideoSample)."""
    ids: list[int]
    video: object
    positions: dict = field(default_factory=dict, repr=False, compare=False)
    """Its M-RoPE positions per (position scheme, device), computed once per step, not once per pass."""


@dataclass
class CompletionBatch:
    """Hidden states aligned with completion tokens, ready for the loss / log-prob kernels."""
    hidden: torch.Tensor      # (B, Tc, H): hidden state predicting completion token t
    ids: torch.Tensor         # (B, Tc) completion token ids (0 where masked)
    mask: torch.Tensor        # (B, Tc) 1 for real completion tokens
    num_prompt_tokens: int    # tokens of prompt processed in this pass (for metrics)


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def mrope_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    video_grid_thw: Optional[torch.Tensor], second_per_grid_ts: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """3D (M-RoPE) position ids (3, B, L) for right- or left-padded sequences with one video each.

    The single place positions are computed: rollout, scoring and training all agree by construction.
    """
    video_id = model.config.video_token_id
    mm_types = (input_ids == video_id).to(torch.int32) * 2  # 0 text, 2 video
    kwargs = dict(input_ids=input_ids, mm_token_type_ids=mm_types, video_grid_thw=video_grid_thw,
                  attention_mask=attention_mask)
    if model.config.model_type == "qwen2_5_vl" and second_per_grid_ts is not None:
        kwargs["second_per_grid_ts"] = second_per_grid_ts
    pos, _ = model.model.get_rope_index(**kwargs)
    return pos


def video_inputs(videos: Sequence[object], device) -> dict:
    """pixel_values_videos / video_grid_thw / second_per_grid_ts for a list of per-sequence videos."""
    return {
        "pixel_values_videos": torch.cat([v.pixel_values_videos for v in videos]).to(device),
        "video_grid_thw": torch.cat([v.video_grid_thw for v in videos]).to(device),
        "second_per_grid_ts": torch.tensor([float(v.second_per_grid_ts) for v in videos], device=device),
    }


def completion_hidden_states(model, prompts: Sequence[Prompt], completions: Sequence[Sequence[int]],
                             prompt_index: Sequence[int], pad_id: int = 0) -> CompletionBatch:
    """Run the decoder over ``prompts[prompt_index[i]] + completions[i]`` for every i.

    Shapes: B = len(completions), L = longest prompt+completion, Tc = longest completion.
    """
    device = next(model.parameters()).device
    video_id = model.config.video_token_id
    if any(video_id in c for c in completions):
        raise ValueError("a completion contains the video placeholder token; rollout must suppress it")
    seqs = [prompts[p].ids + list(c) for p, c in zip(prompt_index, completions)]
    B, L = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, :len(s)] = torch.tensor(s)
        attn[b, :len(s)] = 1
    input_ids, attn = input_ids.to(device), attn.to(device)
    vids = video_inputs([prompts[p].video for p in prompt_index], device)
    vids["pixel_values_videos"] = vids["pixel_values_videos"].to(model.dtype)
    pos = mrope_positions(model, input_ids, attn, vids["video_grid_thw"], vids["second_per_grid_ts"])
    mm_types = (input_ids == model.config.video_token_id).to(torch.int32) * 2
    out = model.model(input_ids=input_ids, attention_mask=attn, position_ids=pos,
                      pixel_values_videos=vids["pixel_values_videos"], video_grid_thw=vids["video_grid_thw"],
                      mm_token_type_ids=mm_types, use_cache=False)
    h = out.last_hidden_state  # (B, L, H)
    Tc = max((len(c) for c in completions), default=0)
    Tc = max(Tc, 1)
    # Hidden state at position j predicts token j+1: completion token t of sequence b sits at
    # prompt_len + t, so it is predicted from prompt_len + t - 1.
    idx = torch.zeros((B, Tc), dtype=torch.long)
    ids = torch.zeros((B, Tc), dtype=torch.long)
    mask = torch.zeros((B, Tc), dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_index, completions)):
        n, P = len(c), len(prompts[p].ids)
        idx[b, :n] = torch.arange(P - 1, P - 1 + n)
        ids[b, :n] = torch.tensor(list(c), dtype=torch.long)
        mask[b, :n] = 1
    idx, ids, mask = idx.to(device), ids.to(device), mask.to(device)
    hidden = h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, Tc, H)
    return CompletionBatch(hidden, ids, mask, sum(len(prompts[p].ids) for p in prompt_index))
