"""The dense format reward of EBM-RL, in [-5, 5] (DESIGN.md §1).

For tags (v, t, a), e.g. (vision, think, answer):
  * each of the six tags <v> </v> <t> </t> <a> </a>: +0.5 if it occurs exactly once, else -0.5
  * +1 if ``<v>..</v>[^<]*<t>..</t>[^<]*<a>..</a>`` matches (blocks in order, only plain text between)
  * +0.5 if the (whitespace-stripped) text starts with <v>, else -1
  * +0.5 if it ends with </a>, else -1

Identical to the reference code's ``format_reward`` (its ``^\s*<vision>`` / ``</answer>\s*$`` are the
stripped start and end here); tests/rewards/test_format.py checks the two agree on random strings.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

from fastebm.rewards.registry import register
from fastebm.rewards.text import extract_tag  # noqa: F401  (re-exported)


@lru_cache(maxsize=16)
def _order_re(v: str, t: str, a: str) -> re.Pattern:
    return re.compile(rf"<{v}>.*?</{v}>[^<]*<{t}>.*?</{t}>[^<]*<{a}>.*?</{a}>", re.DOTALL)


def format_reward(text: str, tags: Sequence[str] = ("vision", "think", "answer")) -> float:
    v, t, a = tags
    score = 0.0
    for tag in (f"<{v}>", f"</{v}>", f"<{t}>", f"</{t}>", f"<{a}>", f"</{a}>"):
        score += 0.5 if text.count(tag) == 1 else -0.5
    if _order_re(v, t, a).search(text):
        score += 1.0
    s = text.strip()
    score += 0.5 if s.startswith(f"<{v}>") else -1.0
    score += 0.5 if s.endswith(f"</{a}>") else -1.0
    return score


@register("format")
def make_format_reward(cfg, context):
    tags = tuple(context.tags)

    def fn(completions, inputs):
        return [format_reward(c, tags) for c in completions]
    return fn
