"""Which implementation a public kernel function runs: Triton or the memory-bounded PyTorch path.

``backend="auto"`` (the default everywhere) picks Triton when the tensors live on a CUDA device and
the chunked PyTorch path otherwise, so the same call works on a CPU-only machine without ever
materialising full logits. ``FASTEBM_KERNEL_BACKEND=triton|torch`` overrides ``auto``; tests force
``backend="triton"`` on the CPU to run the kernels under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("FASTEBM_KERNEL_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"FASTEBM_KERNEL_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise RuntimeError("backend='triton' on a non-CUDA device needs TRITON_INTERPRET=1 "
                           "(set before triton is first imported)")
    return backend
