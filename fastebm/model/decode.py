"""Group sampling on a shared prefix: prefill once, decode G samples with cascade attention.

For each prompt:

  1. prefill   the video + prompt prefix runs ONCE (vision tower included, batch of one); its
               per-layer K/V (1 x Hkv x P x D) are kept as they are — never copied per sample;
  2. decode    the G samples advance in lockstep through a small static-KV decode loop: every
               layer writes the new token's K/V into a static per-sample buffer (G x Hkv x Tmax x D)
               and attends to [shared prefix ; own suffix] with ``fastebm.kernels.cascade_attention``
               (Triton on CUDA, the same two-phase math in PyTorch on the CPU);
  3. stop      per sample at EOS; the loop ends when every sample has stopped or at max_new_tokens.

Positions continue from the prefix with ``fastebm.model.prefix.prefix_positions`` (suffix token t
at ``p_next + t``), the function the packed scoring and training forwards use too. The decode loop
calls the model's own modules (embedding, norms, projections, MLP, rotary embedding), so the
arithmetic is the model's; only the attention's memory layout differs.

The sampled tokens' log-probs (at the sampling temperature) come back with the rollout: they are
the old policy's log-probs, computed on the rollout's prefix cache, so ``grpo.mu > 1`` needs no
extra forward.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from fastebm.kernels.cascade_attention import cascade_attention
from fastebm.model.forward import Prompt, lm_head_weight, video_inputs
from fastebm.model.prefix import prefix_positions
from fastebm.model.rollout import RolloutResult, eos_ids, suppressed_ids


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(G, V) fp32 logits (suppressed tokens already -inf) -> (G,) token ids; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # as transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class _PrefixDecoder:
    """The model's text decoder run one token at a time for G samples against one cached prefix."""

    def __init__(self, model, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], G: int, max_new: int):
        self.model = model
        self.lm = model.model.language_model
        attn0 = self.lm.layers[0].self_attn
        self.rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        self.prefix_kv = prefix_kv                                    # per layer: (Hkv, P, D) each
        Hkv, _, D = prefix_kv[0][0].shape
        dev, dt = prefix_kv[0][0].device, prefix_kv[0][0].dtype
        # static per-sample suffix buffers: (G, Hkv, max_new, D) per layer
        self.k = [torch.zeros((G, Hkv, max_new, D), device=dev, dtype=dt) for _ in self.lm.layers]
        self.v = [torch.zeros((G, Hkv, max_new, D), device=dev, dtype=dt) for _ in self.lm.layers]
        self.G = G

    def step(self, tokens: torch.Tensor, t: int, position: int) -> torch.Tensor:
        """Feed suffix token ``t`` (G,) at ``position``; return the final hidden states (G, H)."""
        G = self.G
        x = self.lm.embed_tokens(tokens)[:, None]                                   # (G, 1, H)
        pos = torch.full((3, G, 1), position, dtype=torch.long, device=x.device)
        cos, sin = self.lm.rotary_emb(x, pos)
        for i, layer in enumerate(self.lm.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(G, 1, -1, a.head_dim).transpose(1, 2)             # (G, Hq, 1, D)
            k = a.k_proj(h).view(G, 1, -1, a.head_dim).transpose(1, 2)             # (G, Hkv, 1, D)
            v = a.v_proj(h).view(G, 1, -1, a.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            self.k[i][:, :, t] = k[:, :, 0]
            self.v[i][:, :, t] = v[:, :, 0]
            pk, pv = self.prefix_kv[i]
            o = cascade_attention(q[:, :, 0], pk, pv, self.k[i], self.v[i], t + 1, scale=a.scaling)  # (G, Hq, D)
            x = x + a.o_proj(o.reshape(G, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm.norm(x)[:, 0]


@torch.no_grad()
def shared_prefix_rollout(model, tokenizer, prompts: Sequence[Prompt], cfg,
                          generator: Optional[torch.Generator] = None) -> RolloutResult:
    """Same contract as ``fastebm.model.rollout.rollout`` (``cfg``: the ``[rollout]`` section)."""
    device = next(model.parameters()).device
    G, T = cfg.group_size, cfg.max_new_tokens
    temp = cfg.temperature
    stops = torch.tensor(eos_ids(model, tokenizer), device=device)
    suppress = torch.tensor(suppressed_ids(model), device=device, dtype=torch.long)
    W = lm_head_weight(model)
    was_training = model.training
    model.eval()
    comps, index, truncated, logps_out, prefill = [], [], [], [], 0
    try:
        for p_i, prompt in enumerate(prompts):
            # 1. prefill once
            ids = torch.tensor([prompt.ids], device=device)
            vids = video_inputs([prompt.video], device)
            ppos, p_next = prefix_positions(model, prompt, device)
            out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=ppos[:, None],
                              pixel_values_videos=vids["pixel_values_videos"].to(model.dtype),
                              video_grid_thw=vids["video_grid_thw"],
                              mm_token_type_ids=(ids == model.config.video_token_id).to(torch.int32) * 2,
                              use_cache=True)
            prefill += len(prompt.ids)
            kv = [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]  # (Hkv, P, D)
            dec = _PrefixDecoder(model, kv, G, T)
            h = out.last_hidden_state[:, -1].expand(G, -1)                          # (G, H): same for all
            tokens = torch.zeros((G, T), dtype=torch.long, device=device)
            lps = torch.zeros((G, T), dtype=torch.float32, device=device)
            done = torch.zeros(G, dtype=torch.bool, device=device)
            n_steps = T
            # 2. decode in lockstep
            for t in range(T):
                logits = (h @ W.t()).float()                                        # (G, V)
                masked = logits.clone()
                masked[:, suppress] = float("-inf")
                nxt = sample_tokens(masked, temp, cfg.top_k, cfg.top_p, generator)
                lps[:, t] = torch.log_softmax(logits / (temp if temp > 0 else 1.0), -1).gather(1, nxt[:, None])[:, 0]
                tokens[:, t] = nxt
                done |= torch.isin(nxt, stops)
                if bool(done.all()) or t == T - 1:
                    n_steps = t + 1
                    break
                h = dec.step(nxt, t, p_next + t)
            # 3. cut each sample at its first EOS
            tok, lp = tokens[:, :n_steps].tolist(), lps[:, :n_steps].tolist()
            for g in range(G):
                cut = next((j for j, x in enumerate(tok[g]) if x in set(stops.tolist())), None)
                end = n_steps if cut is None else cut + 1
                comps.append(tok[g][:end])
                logps_out.append(lp[g][:end])
                truncated.append(cut is None)
                index.append(p_i)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
    return RolloutResult(comps, index, texts, truncated, prefill, logps_out)
