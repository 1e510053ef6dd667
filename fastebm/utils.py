"""Small utilities every layer may use (this module imports nothing from fastebm)."""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import Callable


def quiet_transformers() -> None:
    """No per-shard progress bars from transformers in fastebm's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def build_dir_once(path: str, build: Callable[[str], None], marker: str = ".complete", marker_text: str = "ok\n") -> str:
    """``path``, built by ``build(tmp_dir)`` the first time and renamed into place (atomic).

    A directory is complete when it holds ``marker``; concurrent builders (ranks, test workers)
    race harmlessly: the first rename wins and the others discard their copy.
    """
    if os.path.isfile(os.path.join(path, marker)):
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    build(tmp)
    with open(os.path.join(tmp, marker), "w") as f:
        f.write(marker_text)
    try:
        os.replace(tmp, path)
    except OSError:  # a concurrent builder won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path
