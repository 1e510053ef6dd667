"""Disk cache of decoded, resized clips, keyed by the file's content hash and the sampling parameters.

An entry holds the resized uint8 policy frames, the CLIP frames and the metadata (``.pt``, written
atomically). Normalisation and patchify run on load: they are exact on uint8 input, so a cached
sample is bit-identical to a fresh one from the same backend, and the entry is 4x smaller than
float32 patches. Renaming or moving a file keeps its entry (content hash); editing it, or changing
fps / frame limits / pixel limits / patch sizes / clip_size, makes a new one. Entries store which
backend made them (``meta.backend``); a cache filled on the CPU serves a GPU run as is.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Optional

import torch

from .common import VideoError, VideoMeta

FORMAT = 1
"""Bumped when the entry layout or the preprocessing changes: old entries are then ignored."""

_hash_memo: dict = {}
_memo_lock = threading.Lock()


def content_hash(path: str) -> str:
    """blake2b-128 of the file's bytes, memoised per (path, size, mtime) within the process."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoError(path, "file not found") from None
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if key in _hash_memo:
            return _hash_memo[key]
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise VideoError(path, f"cannot read: {e.strerror}") from None
    digest = h.hexdigest()
    with _memo_lock:
        _hash_memo[key] = digest
    return digest


class VideoCache:
    """``get`` / ``put`` of (policy frames, CLIP frames, meta) under ``root``."""

    def __init__(self, root: str):
        self.root = os.path.expanduser(root)

    def key(self, path: str, params: dict) -> str:
        text = json.dumps({"format": FORMAT, "params": params}, sort_keys=True)
        return hashlib.blake2b((content_hash(path) + text).encode(), digest_size=16).hexdigest()

    def entry_path(self, path: str, params: dict) -> str:
        k = self.key(path, params)
        return os.path.join(self.root, k[:2], k + ".pt")

    def get(self, path: str, params: dict) -> Optional[tuple[torch.Tensor, torch.Tensor, VideoMeta]]:
        f = self.entry_path(path, params)
        if not os.path.exists(f):
            return None
        try:
            d = torch.load(f, map_location="cpu", weights_only=True)
            meta = VideoMeta(**d["meta"])
        except Exception:  # unreadable or stale entry: decode again and overwrite it
            return None
        meta.path = path  # the same bytes may live under another name
        return d["policy"], d["clip"], meta

    def put(self, path: str, params: dict, policy: torch.Tensor, clip: torch.Tensor, meta: VideoMeta) -> str:
        f = self.entry_path(path, params)
        os.makedirs(os.path.dirname(f), exist_ok=True)
        tmp = f"{f}.{os.getpid()}.{threading.get_ident()}.tmp"
        torch.save({"policy": policy.cpu().contiguous(), "clip": clip.cpu().contiguous(), "meta": meta.to_dict(),
                    "params": params}, tmp)
        os.replace(tmp, f)
        return f
