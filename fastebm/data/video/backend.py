"""Which decoder takes a file: ``choose_backend`` (``backend`` / ``video.backend``).

- ``pyav``: PyAV on the CPU, every codec FFmpeg decodes.
- ``dali``: DALI; on a GPU (``device="mixed"``) H.264/HEVC/AV1/VP8/VP9/MJPEG/MPEG-4, on the CPU
  only VP8/VP9/MJPEG. Asking DALI for a codec it cannot decode here is a ``VideoError`` naming the
  file and the codec, never a silent fallback.
- ``auto``: DALI on a GPU when it is installed and takes the codec; on the CPU, per file, the
  backend in ``CPU_PREFERENCE`` for the codec (the faster one in bench/test_bench_video.py),
  else PyAV. The choice is in ``meta.backend`` and logged once per (codec, choice).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import dali_backend
from .common import VideoError

log = logging.getLogger("fastebm.video")

CPU_PREFERENCE = {"vp9": "pyav", "vp8": "pyav", "mjpeg": "pyav"}
"""Backend ``auto`` takes on the CPU per codec, from the bench on the 2-core CPU dev machine
(720p VP9: PyAV ~ 2x DALI-CPU). Codecs not listed: PyAV (the only CPU backend that decodes them)."""

_logged: set = set()


def gpu_available() -> bool:
    return torch.cuda.is_available()


def choose_backend(requested: str, codec: str, path: str = "", *, gpu: Optional[bool] = None) -> tuple[str, bool]:
    """(backend, on_gpu) for a file with ``codec``. Raises VideoError when ``requested`` cannot serve it."""
    gpu = gpu_available() if gpu is None else gpu
    if requested == "pyav":
        return "pyav", False
    if requested == "dali":
        if not dali_backend.available():
            raise VideoError(path, "backend 'dali' asked but nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
        if not dali_backend.can_decode(codec, gpu):
            raise VideoError(path, dali_backend.codec_reason(codec, gpu))
        return "dali", gpu
    if requested != "auto":
        raise ValueError(f"video backend {requested!r}: expected 'auto', 'pyav' or 'dali'")
    if gpu and dali_backend.available() and dali_backend.can_decode(codec, True):
        choice = ("dali", True)
    elif CPU_PREFERENCE.get(codec) == "dali" and dali_backend.available() and dali_backend.can_decode(codec, False):
        choice = ("dali", False)
    else:
        choice = ("pyav", False)
    if (codec, choice) not in _logged:
        _logged.add((codec, choice))
        log.info("video backend auto: %s files -> %s on the %s", codec, choice[0], "GPU" if choice[1] else "CPU")
    return choice


def dali_on_gpu(requested: str) -> bool:
    """Whether ``requested`` sends files to DALI on a GPU here (then decoded frames live on the GPU)."""
    return requested in ("auto", "dali") and gpu_available() and dali_backend.available()


def device_name(gpu: bool) -> str:
    return f"cuda:{torch.cuda.current_device()}" if gpu else "cpu"
