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
at ``p_next + t``), the function the packed scoring and training forwards use too. The prefill is
the model's own forward; the decode step is the model's decoder layer written out on the layer's
own weights (the model's ``rotary_emb`` gives every step's cos/sin once per rollout): with a few
rows per step the cost is per-op overhead, so the step avoids module calls and, on the CPU, runs
q/k/v and gate/up as one matmul each (``_LayerWeights``). Tests hold it to the model's forward:
the same greedy tokens as ``generate`` and log-probs within 1e-4 of the scoring forward.

The sampled tokens' log-probs (at the sampling temperature) come back with the rollout: they are
the old policy's log-probs, computed on the rollout's prefix cache, so ``grpo.mu > 1`` needs no
extra forward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastebm.kernels.cascade_attention import cascade_attention
from fastebm.model.forward import Prompt, lm_head_weight, video_inputs
from fastebm.model.prefix import prefix_positions
from fastebm.model.rollout import RolloutResult, eos_ids, suppressed_ids


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(G, V) fp32 logits (suppressed tokens already -inf) -> (G,) token ids; temperature 0 is greedy.

    transformers' sampling, step for step: logits / temperature (TemperatureLogitsWarper), then top-k
    (TopKLogitsWarper: below the k-th largest -> -inf, ties kept), then top-p on what is left
    (TopPLogitsWarper: the low tail whose renormalised mass is <= 1 - top_p -> -inf, the top token always
    kept), then one multinomial draw from the softmax. The rollout's log-probs are NOT these: they are the
    full softmax at the temperature (``shared_prefix_rollout``), as TRL and the released run compute them.
    """
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


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (fp32 statistics, weight applied in the input dtype); fp32 in one op."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _add_linear(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x + y @ weight.T`` (a residual add after a bias-free projection): one ``addmm`` in fp32; in
    low precision the projection is rounded first, as the model's own forward does."""
    if x.dtype == torch.float32:
        return torch.addmm(x, y, weight.t())
    return x + F.linear(y, weight)


class _LayerWeights:
    """One decoder layer's weights, read from the model's modules (FSDP-gathered ones included).

    ``fuse``: q/k/v and gate/up are concatenated once per rollout into one matrix each, so a decode
    step runs 4 matmuls per layer instead of 7. This copies those weights; it is done on the CPU,
    where a decode step with a few rows is bound by per-op overhead, not on CUDA (no extra memory).
    """

    def __init__(self, layer, fuse: bool):
        a, mlp = layer.self_attn, layer.mlp
        self.ln1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.ln2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.head_dim, self.scaling = a.head_dim, a.scaling
        self.n_q = a.q_proj.out_features // a.head_dim
        self.n_kv = a.k_proj.out_features // a.head_dim
        self.q, self.k, self.v = a.q_proj, a.k_proj, a.v_proj
        self.o = a.o_proj.weight
        self.gate, self.up, self.down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        self.act = mlp.act_fn
        self.qkv_t = self.qkv_b = self.gate_up = None
        if fuse:
            self.qkv_t = torch.cat([self.q.weight, self.k.weight, self.v.weight]).t().contiguous()
            self.qkv_b = torch.cat([self._bias(m) for m in (self.q, self.k, self.v)])
            self.gate_up = torch.cat([self.gate, self.up])

    @staticmethod
    def _bias(lin):
        return lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)

    def qkv(self, h: torch.Tensor):
        """(R, H) -> q and k as one (R, Hq + Hkv, D) tensor (rotated together), v (R, Hkv, D)."""
        R, D, nq, nkv = h.shape[0], self.head_dim, self.n_q, self.n_kv
        if self.qkv_t is not None:
            qkv = torch.addmm(self.qkv_b, h, self.qkv_t).view(R, nq + 2 * nkv, D)
            return qkv[:, :nq + nkv], qkv[:, nq + nkv:]
        qk = torch.cat([F.linear(h, self.q.weight, self.q.bias), F.linear(h, self.k.weight, self.k.bias)], -1)
        return qk.view(R, nq + nkv, D), F.linear(h, self.v.weight, self.v.bias).view(R, nkv, D)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            g, u = F.linear(h, self.gate_up).chunk(2, dim=-1)
        else:
            g, u = F.linear(h, self.gate), F.linear(h, self.up)
        return self.act(g) * u


class _PrefixDecoder:
    """The model's text decoder run one token at a time for B*G samples against B cached prefixes.

    The step is the model's decoder layer (pre-norm attention and MLP with residuals; the rotary
    embedding of the model's own ``rotary_emb``) written out on the layer's weights, without
    module calls or per-step position computation: rows are few, so per-op overhead is the cost.
    """

    def __init__(self, model, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], prefix_len: list[int],
                 rows: int, max_new: int, fuse: Optional[bool] = None):
        self.lm = model.model.language_model
        self.prefix_kv = prefix_kv                                    # per layer: (B, Hkv, Pmax, D) each
        self.prefix_len = prefix_len
        _, Hkv, _, D = prefix_kv[0][0].shape
        dev, dt = prefix_kv[0][0].device, prefix_kv[0][0].dtype
        fuse = dev.type == "cpu" if fuse is None else fuse
        self.layers = [_LayerWeights(layer, fuse) for layer in self.lm.layers]
        self.embed, self.norm = self.lm.embed_tokens.weight, (self.lm.norm.weight, self.lm.norm.variance_epsilon)
        # static per-sample suffix buffers: (B*G, Hkv, max_new, D) per layer
        self.k = [torch.zeros((rows, Hkv, max_new, D), device=dev, dtype=dt) for _ in self.lm.layers]
        self.v = [torch.zeros((rows, Hkv, max_new, D), device=dev, dtype=dt) for _ in self.lm.layers]
        self.rows = rows

    def rotary_table(self, first: torch.Tensor, T: int, dtype: torch.dtype):
        """cos/sin of every decode position of every row, computed once with the model's
        ``rotary_emb``: (R, T, 1, D) each. The rotation x*cos + rotate_half(x)*sin is applied as
        x*cos + roll(x, D/2)*sin_signed, sin_signed = [-sin_1 ; sin_2] (the same products)."""
        R = self.rows
        pos = (first[:, None] + torch.arange(T, device=first.device)[None]).view(1, R, T).expand(3, R, T)
        probe = torch.zeros((R, T, 1), dtype=dtype, device=first.device)
        cos, sin = self.lm.rotary_emb(probe, pos)
        half = sin.shape[-1] // 2
        self.cos = cos[:, :, None].contiguous()
        self.sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, :, None].contiguous()

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed suffix token ``t`` of every row (R,); final hidden states (R, H)."""
        x = F.embedding(tokens, self.embed)                                         # (R, H)
        cos, sin = self.cos[:, t], self.sin[:, t]                                   # (R, 1, D)
        for i, w in enumerate(self.layers):
            qk, v = w.qkv(_rms_norm(x, *w.ln1))                                     # (R, Hq+Hkv, D), (R, Hkv, D)
            qk = qk * cos + qk.roll(w.head_dim // 2, dims=-1) * sin
            self.k[i][:, :, t] = qk[:, w.n_q:]
            self.v[i][:, :, t] = v
            pk, pv = self.prefix_kv[i]
            o = cascade_attention(qk[:, :w.n_q], pk, pv, self.prefix_len, self.k[i], self.v[i], t + 1,
                                  scale=w.scaling)                                   # (R, Hq, D)
            x = _add_linear(x, o.reshape(x.shape[0], -1), w.o)
            x = _add_linear(x, w.mlp(_rms_norm(x, *w.ln2)), w.down)
        return _rms_norm(x, *self.norm)


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
                          seeds: Optional[Sequence[int]] = None, fuse: Optional[bool] = None) -> RolloutResult:
    """Same contract as ``fastebm.model.rollout.rollout`` (``cfg``: the ``[rollout]`` section).

    ``seeds``: one sampling seed per prompt (default: drawn from torch's global generator).
    ``fuse``: concatenate the q/k/v and gate/up weights for the decode loop (default: on the CPU
    only; see ``_LayerWeights``).
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
        dec = _PrefixDecoder(model, _pad_prefixes(kvs), lens, R, T, fuse=fuse)
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
