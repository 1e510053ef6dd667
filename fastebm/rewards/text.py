"""Text helpers shared by the rewards: tag blocks and the reference code's two sentence splitters."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional, Sequence

# PCG safeguard splitter (as the reference's PCG trainer): after . ! ? followed by space or a capital,
# and at newlines; common abbreviations (Mr. Dr. e.g. ...) do not end a sentence.
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[.!?])(?=[A-Z])|\n+")
_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e)\.\s", re.IGNORECASE)
_PROTECT = "\x00"

# CLIP sentence-top-k splitter (as the reference's CLIP server): at . ! ? 。 ！ ？ and newlines; pieces of
# 5 characters or fewer and bare list numbers ("2.") are dropped.
_CLIP_SPLIT = re.compile(r"[.!?。！？\n]")
_NUMBERING = re.compile(r"^\d+\.?$")


def extract_tag(text: str, tag: str) -> Optional[str]:
    """The stripped content of the first ``<tag>…</tag>`` block, or None when there is none."""
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return m.group(1).strip() if m else None


@lru_cache(maxsize=16)
def _vt_re(v: str, t: str) -> re.Pattern:
    return re.compile(rf"(<{v}>.*?</{v}>)[^<]*(<{t}>.*?</{t}>)", re.DOTALL)


def vision_think_blocks(text: str, tags: Sequence[str] = ("vision", "think", "answer")) -> Optional[tuple[str, str]]:
    """``(<v>…</v>, <t>…</t>)``, the first vision block followed (only plain text between) by a think
    block, tags included; None when the completion has no such pair (PCG then scores 0)."""
    m = _vt_re(tags[0], tags[1]).search(text)
    return (m.group(1), m.group(2)) if m else None


def split_sentences(text: str) -> list[str]:
    """Sentences of a <think> text, as the PCG safeguard splits them."""
    if not text or not text.strip():
        return []
    protected = _ABBREV.sub(lambda m: m.group().replace(". ", "." + _PROTECT), text)
    parts = _SENT_SPLIT.split(protected)
    return [p.replace("." + _PROTECT, ". ").strip() for p in parts if p and p.strip()]


def clip_sentences(text: str) -> list[str]:
    """Sentences of a <vision> text for CLIP's sentence-top-k mode (the whole text when none qualifies)."""
    parts = [s.strip() for s in _CLIP_SPLIT.split(text)]
    out = [s for s in parts if len(s) > 5 and not _NUMBERING.match(s)]
    return out or [text]
