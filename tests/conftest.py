"""Shared test setup.

Triton kernels run on the CPU through the interpreter: TRITON_INTERPRET must be set before Triton
is first imported, so it is set here, before any test module imports fastebm.kernels.
"""
import os

try:  # decide without importing torch.cuda machinery twice
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
