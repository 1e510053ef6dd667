"""Reading a generated output: the lenient ``<answer>`` text and the tagged parts.

Lenient extraction, as the release's judge scripts read an answer: the text after the first
``<answer>`` up to ``</answer>`` or the end of the output (a completion cut by the token limit still
has an answer); without an ``<answer>`` tag, the output with its ``<vision>…</vision>`` and
``<think>…</think>`` blocks and any stray tag removed (so a vanilla, untagged reply is its own
answer). Empty is ``None``: the judge scores it 0 without asking. Tag names are the recipe's
``data.tags``; matching ignores case, as the release's.

The strict reading (``strict_answer``: a closed ``<answer>…</answer>`` block, whitespace stripped)
is the VideoQA scorers' exact-match reading.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional, Sequence

from fastebm.rewards.format import format_reward

TAGS = ("vision", "think", "answer")


@lru_cache(maxsize=16)
def _patterns(v: str, t: str, a: str) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    f = re.DOTALL | re.IGNORECASE
    return (re.compile(rf"<{a}>\s*(.*?)(?:</{a}>|$)", f),
            re.compile(rf"<({v}|{t})>.*?</\1>", f),
            re.compile(rf"</?({v}|{t}|{a})>", re.IGNORECASE))


def lenient_answer(text: str, tags: Sequence[str] = TAGS) -> tuple[Optional[str], bool]:
    """``(answer or None, from_tag)``: the lenient answer and whether an ``<answer>`` tag held it."""
    if not text:
        return None, False
    answer_re, blocks_re, tag_re = _patterns(*tags)
    m = answer_re.search(text)
    if m:
        return (m.group(1).strip() or None), True
    rest = tag_re.sub("", blocks_re.sub("", text)).strip()
    return (rest or None), False


def tag_text(text: str, tag: str) -> Optional[str]:
    """The stripped content of the first ``<tag>…</tag>`` block (case-insensitive), or None."""
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text or "", re.DOTALL | re.IGNORECASE)
    return m.group(1).strip() if m else None


def strict_answer(text: str, tag: str = "answer", ignore_case: bool = False) -> Optional[str]:
    """The stripped content of the first closed ``<tag>…</tag>`` block, or None (VideoQA scoring)."""
    m = re.search(rf"<{tag}>\s*(.*?)\s*</{tag}>", text or "", re.DOTALL | (re.IGNORECASE if ignore_case else 0))
    return m.group(1).strip() if m else None


def parse_output(text: str, tags: Sequence[str] = TAGS) -> dict:
    """The fields ``fastebm generate`` writes about one output: the lenient answer (and whether it
    came from a tag), the vision and think texts (None when absent), the dense format reward and
    whether the format is strictly right (the reward's maximum, 5)."""
    answer, tagged = lenient_answer(text, tags)
    fmt = format_reward(text, tuple(tags))
    return {"answer": answer, "answer_tagged": tagged, "vision": tag_text(text, tags[0]),
            "think": tag_text(text, tags[1]), "format_reward": fmt, "format_strict": fmt == 5.0}
