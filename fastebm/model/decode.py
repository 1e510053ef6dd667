"""Group sampling on a shared prefix: prefill once, decode G samples with cascade attention.

  1. prefill   each prompt's video + prompt prefix runs ONCE (vision tower included, batch of one);
               its per-layer K/V (Hkv x P x D) are kept once — never copied per sample (prompts of
               different lengths are padded into one B x Hkv x Pmax x D tensor per layer);
  2. decode    the B x G samples of all prompts advance in lockstep through a small static-KV
               decode loop: every layer writes the new token's K/V into a static per-sample buffer
               (B*G x Hkv x Tmax x D) and attends to [its prompt's prefix ; its own suffix] with
               ``fastebm.kernels.cascade_attention`` (Triton on CUDA, the same math in PyTorch on
               the CPU);
  3. stop      per sample at EOS; the loop ends when every sample has stopped or at max_new_tokens.

Sampling uses one generator per prompt seeded from ``seeds`` (the trainer derives them from
run.seed, step and the prompt's global index), so a prompt's samples do not depend on the other
prompts in the batch or on how prompts are spread over ranks.

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
    """The model's text decoder run one token at a time for B*G samples against B cached prefixes."""

    def __init__(self, model, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], prefix_len: list[int],
                 rows: int, max_new: int):
        self.model = model
        self.lm = model.model.language_model
        attn0 = self.lm.layers[0].self_attn
        self.rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        self.prefix_kv = prefix_kv                                    # per layer: (B, Hkv, Pmax, D) each
        self.prefix_len = prefix_len
        _, Hkv, _, D = prefix_kv[0][0].shape
        dev, dt = prefix_kv[0][0].device, prefix_kv[0][0].dtype
        # static per-sample suffix buffers: (B*G, Hkv, max_new, D) per layer
        self.k = [torch.zeros((rows, Hkv, max_new, D), device=dev, dtype=dt) for _ in self.lm.layers]
        self.v = [torch.zeros((rows, Hkv, max_new, D), device=dev, dtype=dt) for _ in self.lm.layers]
        self.rows = rows

    def rotary_table(self, first: torch.Tensor, T: int, dtype: torch.dtype):
        """cos/sin of every decode position of every row, computed once: (R, T, D) each."""
        R = self.rows
        pos = (first[:, None] + torch.arange(T, device=first.device)[None]).view(1, R, T).expand(3, R, T)
        probe = torch.zeros((R, T, 1), dtype=dtype, device=first.device)
        self.cos, self.sin = self.lm.rotary_emb(probe, pos)

    @staticmethod
    def _norm(norm, x):
        """The model's RMSNorm (fp32 statistics, weight applied in the input dtype) as one fused op."""
        y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
        return norm.weight * y.to(x.dtype)

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed suffix token ``t`` of every row (R,); final hidden states (R, H)."""
        R = self.rows
        x = self.lm.embed_tokens(tokens)[:, None]                                   # (R, 1, H)
        cos, sin = self.cos[:, t:t + 1], self.sin[:, t:t + 1]
        for i, layer in enumerate(self.lm.layers):
            a = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            q = a.q_proj(h).view(R, 1, -1, a.head_dim).transpose(1, 2)             # (R, Hq, 1, D)
            k = a.k_proj(h).view(R, 1, -1, a.head_dim).transpose(1, 2)             # (R, Hkv, 1, D)
            v = a.v_proj(h).view(R, 1, -1, a.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            self.k[i][:, :, t] = k[:, :, 0]
            self.v[i][:, :, t] = v[:, :, 0]
            pk, pv = self.prefix_kv[i]
            o = cascade_attention(q[:, :, 0], pk, pv, self.prefix_len, self.k[i], self.v[i], t + 1,
                                  scale=a.scaling)                                   # (R, Hq, D)
            x = x + a.o_proj(o.reshape(R, 1, -1))
            x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        return self._norm(self.lm.norm, x)[:, 0]


def _pad_prefixes(per_prompt: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the prompts' (Hkv, P_b, D) K/V stacked into (B, Hkv, Pmax, D) (zero padding)."""
    out = []
    for layer in zip(*per_prompt):
        P = max(k.shape[1] for k, _ in layer)
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, P - x.shape[1]))  # noqa: E731
        out.append((torch.stack([pad(k) for k, _ in layer]), torch.stack([pad(v) for _, v in layer])))
    return out


@torch.no_grad()
def shared_prefix_rollout(model, tokenizer, prompts: Sequence[Prompt], cfg,
                          seeds: Optional[Sequence[int]] = None) -> RolloutResult:
    """Same contract as ``fastebm.model.rollout.rollout`` (``cfg``: the ``[rollout]`` section).

    ``seeds``: one sampling seed per prompt (default: drawn from torch's global generator).
    """
    device = next(model.parameters()).device
    B, G, T = len(prompts), cfg.group_size, cfg.max_new_tokens
    R, temp = B * G, cfg.temperature
    stops = torch.tensor(eos_ids(model, tokenizer), device=device)
    stop_set = set(stops.tolist())
    suppress = torch.tensor(suppressed_ids(model), device=device, dtype=torch.long)
    if seeds is None:
        seeds = [int(x) for x in torch.randint(0, 2**62, (B,))]
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    W = lm_head_weight(model)
    was_training = model.training
    model.eval()
    try:
        # 1. prefill each prompt once
        kvs, lens, p_next, last = [], [], [], []
        for prompt in prompts:
            ids = torch.tensor([prompt.ids], device=device)
            vids = video_inputs([prompt.video], device)
            ppos, nxt_pos = prefix_positions(model, prompt, device)
            out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=ppos[:, None],
                              pixel_values_videos=vids["pixel_values_videos"].to(model.dtype),
                              video_grid_thw=vids["video_grid_thw"],
                              mm_token_type_ids=(ids == model.config.video_token_id).to(torch.int32) * 2,
                              use_cache=True)
            kvs.append([(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers])  # (Hkv, P, D)
            lens.append(len(prompt.ids))
            p_next.append(nxt_pos)
            last.append(out.last_hidden_state[0, -1])
        dec = _PrefixDecoder(model, _pad_prefixes(kvs), lens, R, T)
        del kvs
        h = torch.stack(last).repeat_interleave(G, dim=0)                           # (R, H)
        dec.rotary_table(torch.tensor(p_next, device=device).repeat_interleave(G), T, h.dtype)  # row r, step t: p_next + t
        tokens = torch.zeros((R, T), dtype=torch.long, device=device)
        lps = torch.zeros((R, T), dtype=torch.float32, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)
        n_steps = T
        # 2. decode every prompt's samples in lockstep
        for t in range(T):
            logits = (h @ W.t()).float()                                            # (R, V)
            masked = logits.clone()
            masked[:, suppress] = float("-inf")
            nxt = torch.cat([sample_tokens(masked[b * G:(b + 1) * G], temp, cfg.top_k, cfg.top_p, gens[b])
                             for b in range(B)])
            scaled = logits / (temp if temp > 0 else 1.0)
            lps[:, t] = scaled.gather(1, nxt[:, None])[:, 0] - torch.logsumexp(scaled, -1)
            tokens[:, t] = nxt
            done |= torch.isin(nxt, stops)
            if bool(done.all()) or t == T - 1:
                n_steps = t + 1
                break
            h = dec.step(nxt, t)
    finally:
        model.train(was_training)
    # 3. cut each sample at its first EOS
    comps, index, truncated, logps_out = [], [], [], []
    tok, lp = tokens[:, :n_steps].tolist(), lps[:, :n_steps].tolist()
    for r in range(R):
        cut = next((j for j, x in enumerate(tok[r]) if x in stop_set), None)
        end = n_steps if cut is None else cut + 1
        comps.append(tok[r][:end])
        logps_out.append(lp[r][:end])
        truncated.append(cut is None)
        index.append(r // G)
    texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
    return RolloutResult(comps, index, texts, truncated, sum(lens), logps_out)
