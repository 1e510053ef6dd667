"""Torch's intra-op threads in decode threads: each decode thread runs its torch ops on one thread.

A thread that runs a parallel torch op gets an OpenMP thread team of its own; once a process has
more OpenMP threads than cores, libgomp throttles its spin-wait and every parallel op of the main
thread pays a thread wake-up. On the 2-core dev machine, while one decode thread with a team was
alive, the main thread's small ops (softmax, a (8, 256) x (256, 768) matmul — a decode step is made
of these) ran 3-8x slower. The decode threads are the parallelism.

Every thread that decodes video calls ``decode_thread_init`` first; every thread that starts decode
threads calls ``keep_torch_threads`` before (``VideoPrefetcher`` does both).
"""
from __future__ import annotations

import torch


def keep_torch_threads() -> None:
    """Call in a thread before it starts decode threads: fixes its own torch thread count.

    ``torch.set_num_threads`` in a decode thread (``decode_thread_init``) also lowers the count a
    thread takes at its first parallel op; a thread that has asked once (this call) keeps its own.
    """
    torch.get_num_threads()


def decode_thread_init() -> None:
    """First call in every thread that decodes video: its torch ops run on one thread (see the module)."""
    torch.set_num_threads(1)
