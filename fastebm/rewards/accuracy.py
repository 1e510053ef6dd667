"""Answer accuracy: similarity of the ``<answer>`` text to the reference line.

First version: ROUGE-L F1 on lower-cased word tokens (BERTScore with a local encoder replaces it
when configured, in the rewards issue). An empty or missing answer scores 0.
"""
from __future__ import annotations

import re

from fastebm.rewards.format import extract_tag
from fastebm.rewards.registry import register

_WORD = re.compile(r"\w+", re.UNICODE)


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


@register("accuracy")
def make_accuracy_reward(cfg, context):
    answer_tag = context.tags[2]

    def fn(completions, inputs):
        out = []
        for i, c in enumerate(completions):
            ans = extract_tag(c, answer_tag)
            out.append(rouge_l_f1(ans, inputs.record_of(i).reference_answer) if ans else 0.0)
        return out
    return fn
