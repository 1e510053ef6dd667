"""Answer accuracy: similarity of the ``<answer>`` text to the reference line, in [0, 1].

With an encoder (``rewards.accuracy.model_path``, or ``tiny``): BERTScore F1 exactly as the
``bert-score`` package computes it with ``idf=False`` and no baseline rescaling (the reference run's
microsoft/deberta-xlarge-mnli, layer 40), clamped to [0, 1]:

  * each sentence is encoded as ``bert_score.utils.sent_encode`` does (stripped, special tokens,
    truncated to the tokenizer's maximum; a prefix space for GPT-2/RoBERTa tokenizers);
  * token embeddings are the output of layer ``num_layers`` (the encoder is cut there, as BERTScore);
  * greedy matching on cosine similarity; each token weighs 1 except [CLS]/[SEP] (weight 0), which
    still take part as match candidates; padding scores 0 in the similarity matrix — all as BERTScore.

The whole step is ONE encoder forward: every distinct answer and reference of the batch, padded
together. Without an encoder: ROUGE-L F1 on lower-cased word tokens. An empty or missing answer
(``<answer></answer>`` included) scores 0 and never reaches the encoder.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch

from fastebm.rewards.registry import register
from fastebm.rewards.text import extract_tag

_WORD = re.compile(r"\w+", re.UNICODE)

# BERTScore's default layer per model (bert_score.utils.model2layers), for the models one would use here.
BERTSCORE_LAYERS = {
    "microsoft/deberta-xlarge-mnli": 40, "microsoft/deberta-large-mnli": 18, "microsoft/deberta-base-mnli": 9,
    "microsoft/deberta-xlarge": 18, "microsoft/deberta-large": 16, "microsoft/deberta-base": 9,
    "microsoft/deberta-v2-xlarge": 10, "roberta-large": 17, "roberta-base": 10, "distilroberta-base": 5,
    "bert-base-uncased": 9, "bert-large-uncased": 18, "distilbert-base-uncased": 5,
    "xlm-roberta-large": 17, "xlm-roberta-base": 9,
}


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    c, r = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not c or not r:
        return 0.0
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def default_num_layers(path: str, config) -> int:
    """BERTScore's layer for the model named by ``config._name_or_path`` or the directory, else the last."""
    names = {os.path.basename(os.path.normpath(path)), str(getattr(config, "_name_or_path", "") or "")}
    for key, layers in BERTSCORE_LAYERS.items():
        if any(n and (n == key or n.rstrip("/").split("/")[-1] == key.split("/")[-1]) for n in names):
            return layers
    return int(config.num_hidden_layers)


class BertScorer:
    """BERTScore F1 with a local encoder; ``score`` runs one forward over the batch's distinct sentences."""

    def __init__(self, path: str, device="cpu", num_layers: int = 0):
        from transformers import AutoModel, AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

        from fastebm.utils import quiet_transformers

        quiet_transformers()
        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"rewards.accuracy.model_path: {path!r} is not a local directory "
                                    "(fastebm does not download models)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
        if hasattr(model, "decoder") and hasattr(model, "encoder"):  # encoder-decoder: BERTScore uses the encoder
            model = model.encoder
        total = int(model.config.num_hidden_layers)
        self.num_layers = num_layers or default_num_layers(path, model.config)
        if not 0 <= self.num_layers <= total:
            raise ValueError(f"rewards.accuracy.num_layers = {self.num_layers}: {path} has {total} layers")
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        self._hidden_index = None
        if isinstance(layers, torch.nn.ModuleList):  # cut the encoder at the layer, as BERTScore does
            model.encoder.layer = torch.nn.ModuleList(list(layers)[:self.num_layers])
        else:  # other layouts: run it whole and take that layer's hidden states
            self._hidden_index = self.num_layers
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.prefix_space = isinstance(self.tokenizer, (GPT2Tokenizer, RobertaTokenizer))
        limit = getattr(model.config, "max_position_embeddings", None) or 10**9
        self.max_length = int(min(self.tokenizer.model_max_length, limit))
        self.zero_ids = {i for i in (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id) if i is not None}

    def encode(self, sentence: str) -> list[int]:
        """Token ids as ``bert_score.utils.sent_encode``."""
        s = sentence.strip()
        if not s:
            return self.tokenizer.build_inputs_with_special_tokens([])
        kw = {"add_prefix_space": True} if self.prefix_space else {}
        return self.tokenizer.encode(s, add_special_tokens=True, max_length=self.max_length, truncation=True, **kw)

    @torch.no_grad()
    def embed(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """One forward: (embeddings (S, L, D), attention mask (S, L), token ids per sentence)."""
        ids = [self.encode(s) for s in sentences]
        pad = self.tokenizer.pad_token_id or 0
        L = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), L), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), L), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        if self._hidden_index is None:
            emb = self.model(input_ids, attention_mask=mask).last_hidden_state
        else:
            emb = self.model(input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[self._hidden_index]
        return emb.float(), mask, ids

    def score(self, cands: Sequence[str], refs: Sequence[str]) -> list[float]:
        """Raw BERTScore F1 of each (candidate, reference) pair (not clamped)."""
        if not cands:
            return []
        uniq = list(dict.fromkeys(list(cands) + list(refs)))
        where = {s: i for i, s in enumerate(uniq)}
        emb, mask, ids = self.embed(uniq)  # (S, L, D): the step's only encoder pass
        emb = emb / emb.norm(dim=-1, keepdim=True)
        weight = torch.tensor([[0.0 if t in self.zero_ids else 1.0 for t in x] + [0.0] * (mask.shape[1] - len(x))
                               for x in ids], device=emb.device)  # (S, L): idf = 1, [CLS]/[SEP] 0
        h = torch.tensor([where[c] for c in cands], device=emb.device)
        r = torch.tensor([where[s] for s in refs], device=emb.device)
        hm, rm = mask[h].float(), mask[r].float()
        Lh, Lr = int(hm.sum(1).max()), int(rm.sum(1).max())  # pad to the batch's longest, as BERTScore
        he, re_ = emb[h, :Lh], emb[r, :Lr]
        sim = torch.bmm(he, re_.transpose(1, 2)) * (hm[:, :Lh, None] * rm[:, None, :Lr])  # (B, Lh, Lr)
        hw, rw = weight[h, :Lh], weight[r, :Lr]
        P = (sim.max(dim=2).values * hw / hw.sum(1, keepdim=True)).sum(1)
        R = (sim.max(dim=1).values * rw / rw.sum(1, keepdim=True)).sum(1)
        F = 2 * P * R / (P + R)
        return F.masked_fill(torch.isnan(F), 0.0).tolist()


@register("accuracy")
def make_accuracy_reward(cfg, context):
    answer_tag = context.tags[2]
    acc = cfg.accuracy
    scorer: Optional[BertScorer] = None
    if acc.tiny or acc.model_path:
        from fastebm.tiny import ensure_tiny_bert

        path = ensure_tiny_bert(context.tiny_cache_dir) if acc.tiny else acc.model_path
        scorer = BertScorer(path, context.device, acc.num_layers)

    def fn(completions, inputs):
        out = [0.0] * len(completions)
        pairs = []  # (index, answer, reference) with both non-empty
        for i, c in enumerate(completions):
            ans, ref = extract_tag(c, answer_tag) or "", inputs.record_of(i).reference_answer.strip()
            if ans and ref:
                pairs.append((i, ans, ref))
        if not pairs:
            return out
        if scorer is None:
            for i, ans, ref in pairs:
                out[i] = rouge_l_f1(ans, ref)
            return out
        f1 = scorer.score([p[1] for p in pairs], [p[2] for p in pairs])
        for (i, _, _), f in zip(pairs, f1):
            out[i] = min(1.0, max(0.0, f))
        return out

    fn.scorer = scorer  # for tests and benchmarks (forward counting)
    return fn
