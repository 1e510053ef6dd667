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


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread for a module (``pytestmark = pytest.mark.usefixtures(...)``).
    With two, every small op waits on a thread barrier, which on a loaded 2-core machine made the loss
    tests ~100x slower (0.3 s per tiny backward); results do not depend on it (both sides of every
    comparison run in the same setting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
