"""Shared-prefix forward: the video + prompt prefix runs once per prompt for every suffix.

PrefixGrouper-style packing: one row per prompt,

    [ prefix (P) | suffix_1 (S_1) | suffix_2 (S_2) | ... | suffix_k (S_k) | pad ]

with a block attention mask: prefix tokens are causal among themselves; each suffix attends to the
whole prefix and causally to itself, never to another suffix. Suffix positions restart after the
prefix (M-RoPE text positions ``p_next + t`` in all three sections), exactly the positions each
suffix has in its own ``[prefix; suffix]`` sequence. Because the prefix is computed once and every
suffix reads the same prefix keys/values, the forward equals the repeated one token for token, and
the backward sums every suffix's gradient into the one prefix computation — the same gradient as
the repeated forward, at a fraction of the cost when the prefix is long.

Attention in the packed row runs block by block (``fastebm.model.packed_attention``: the prefix
causal once, each suffix against [prefix; its own tokens]) when the model's text attention is SDPA
(the default load). ``attention="mask"`` runs the model's own attention over the dense block mask
instead: the check, and the path for eager attention (an additive float mask, which SDPA and eager
both read; flash-attn cannot take one and is refused).
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastebm.model.forward import CompletionBatch, Prompt, mrope_positions, video_inputs
from fastebm.model import packed_attention
from fastebm.model.packed_attention import RowLayout


def prefix_positions(model, prompt: Prompt, device) -> tuple[torch.Tensor, int]:
    """M-RoPE positions (3, P) of a prompt alone and the first position after it (``p_next``).

    The one function every shared-prefix pass (rollout, scoring, training) uses: suffix token t
    sits at ``p_next + t``.
    """
    vc = model.config.vision_config
    key = (model.config.model_type, vc.spatial_merge_size, getattr(vc, "tokens_per_second", None), str(device))
    if key not in prompt.positions:  # rollout, scoring, PCG and training passes share one computation
        ids = torch.tensor([prompt.ids], device=device)
        v = video_inputs([prompt.video], device)
        pos = mrope_positions(model, ids, torch.ones_like(ids), v["video_grid_thw"], v["second_per_grid_ts"])
        prompt.positions[key] = (pos[:, 0], int(pos.max()) + 1)
    return prompt.positions[key]


def pack_groups(prompt_index: Sequence[int]) -> list[tuple[int, list[int]]]:
    """[(prompt, [positions in the call's sequence list])] in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_index):
        groups.setdefault(p, []).append(i)
    return list(groups.items())


def shared_prefix_hidden_states(model, prompts: Sequence[Prompt], completions: Sequence[Sequence[int]],
                                prompt_index: Sequence[int], pad_id: int = 0,
                                attention: str = "blocks") -> CompletionBatch:
    """Same contract as ``forward.completion_hidden_states``, one packed row per distinct prompt.

    ``attention``: ``"blocks"`` (default) runs the row's attention block by block
    (``fastebm.model.packed_attention``: the prefix causal once, the suffixes against [prefix; own]);
    ``"mask"`` runs the model's own attention with the dense block mask (the check).
    Shapes: R rows (distinct prompts), L = longest P + sum(S), B = len(completions), Tc = longest S.
    """
    if attention not in ("blocks", "mask"):
        raise ValueError(f"attention={attention!r}: expected 'blocks' or 'mask'")
    if attention == "blocks" and not packed_attention.enable(model):
        attention = "mask"  # the model's text attention is not SDPA (eager / flash-attn)
    impl = model.model.language_model.config._attn_implementation
    if attention == "mask" and impl not in ("sdpa", "eager", packed_attention.NAME):
        raise ValueError(f"the packed shared-prefix forward needs SDPA or eager text attention (a 4D block mask); "
                         f"the model has {impl!r}: load it with model.attn_implementation = 'sdpa' or 'auto', "
                         f"or set rollout.shared_prefix = false")
    device = next(model.parameters()).device
    video_id = model.config.video_token_id
    if any(video_id in c for c in completions):
        raise ValueError("a completion contains the video placeholder token; rollout must suppress it")
    groups = pack_groups(prompt_index)
    R = len(groups)
    lengths = [len(prompts[p].ids) + sum(len(completions[i]) for i in members) for p, members in groups]
    L = max(lengths)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros((3, R, L), dtype=torch.long, device=device)
    dense = attention == "mask"
    mask = torch.zeros((R, 1, L, L), dtype=torch.bool, device=device) if dense else None
    layout = []
    B = len(completions)
    Tc = max(1, max((len(c) for c in completions), default=1))
    gather_row = torch.zeros(B, dtype=torch.long)
    gather_idx = torch.zeros((B, Tc), dtype=torch.long)
    ids = torch.zeros((B, Tc), dtype=torch.long)
    cmask = torch.zeros((B, Tc), dtype=torch.long)
    prefix_tokens = 0
    for r, (p, members) in enumerate(groups):
        prompt = prompts[p]
        P = len(prompt.ids)
        prefix_tokens += P
        input_ids[r, :P] = torch.tensor(prompt.ids, device=device)
        ppos, p_next = prefix_positions(model, prompt, device)
        pos[:, r, :P] = ppos
        if dense:
            mask[r, 0, :P, :P] = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        else:
            layout.append(RowLayout.build(P, [len(completions[i]) for i in members], device))
        start = P
        for i in members:
            c = list(completions[i])
            S = len(c)
            end = start + S
            input_ids[r, start:end] = torch.tensor(c, dtype=torch.long, device=device)
            pos[:, r, start:end] = p_next + torch.arange(S, device=device)
            if dense:
                mask[r, 0, start:end, :P] = True
                mask[r, 0, start:end, start:end] = torch.ones(S, S, dtype=torch.bool, device=device).tril()
            # token t of this suffix is predicted by the row position before it: the prefix's last
            # token for t = 0, then the suffix's own tokens.
            gather_row[i] = r
            if S:
                gather_idx[i, 0] = P - 1
                gather_idx[i, 1:S] = torch.arange(start, end - 1)
                ids[i, :S] = torch.tensor(c, dtype=torch.long)
                cmask[i, :S] = 1
            start = end
        if dense and start < L:  # padding attends to itself only (a row of all False would be NaN in SDPA)
            k = torch.arange(start, L, device=device)
            mask[r, 0, k, k] = True
    vids = video_inputs([prompts[p].video for p, _ in groups], device)
    mm_types = (input_ids == video_id).to(torch.int32) * 2
    packed = {} if dense else {"fastebm_packed": layout}  # handed down to every text attention call
    if dense:  # additive float mask: eager attention adds the mask to the scores (a bool would add 0/1)
        mask = torch.zeros_like(mask, dtype=model.dtype).masked_fill(~mask, torch.finfo(model.dtype).min)
    out = model.model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                      pixel_values_videos=vids["pixel_values_videos"].to(model.dtype),
                      video_grid_thw=vids["video_grid_thw"], mm_token_type_ids=mm_types, use_cache=False,
                      **packed)
    h = out.last_hidden_state  # (R, L, H)
    gather_row, gather_idx = gather_row.to(device), gather_idx.to(device)
    hidden = h[gather_row.unsqueeze(1), gather_idx]  # (B, Tc, H)
    return CompletionBatch(hidden, ids.to(device), cmask.to(device), prefix_tokens)
