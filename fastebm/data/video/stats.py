"""Decode counters: how many clips were decoded, by which backend, how many came from the cache.

Every decode and cache read counts here (``count``), in the process that asks for the clip: the
prefetcher counts the decodes of its worker processes when their frames arrive. Tests read
``decode_stats()`` to check that each clip is decoded once per use.
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Optional

_stats_lock = threading.Lock()
_stats: Counter = Counter()


def decode_stats() -> dict:
    """Counts since the last reset: ``decodes`` (files decoded), ``decodes_<backend>``,
    ``cache_hits``, ``errors``; and ``by_path`` {path: decodes} for once-per-step checks."""
    with _stats_lock:
        out = {k: v for k, v in _stats.items() if not k.startswith("path:")}
        out["by_path"] = {k[5:]: v for k, v in _stats.items() if k.startswith("path:")}
        for k in ("decodes", "cache_hits", "errors"):
            out.setdefault(k, 0)
        return out


def reset_decode_stats() -> None:
    with _stats_lock:
        _stats.clear()


def count(event: str, path: Optional[str] = None, backend: Optional[str] = None) -> None:
    """Record a decode (``decode``), a cache hit (``cache_hit``) or an error (``error``)."""
    with _stats_lock:
        if event == "decode":
            _stats["decodes"] += 1
            if backend:
                _stats[f"decodes_{backend}"] += 1
            if path:
                _stats[f"path:{path}"] += 1
        elif event == "cache_hit":
            _stats["cache_hits"] += 1
        elif event == "error":
            _stats["errors"] += 1
