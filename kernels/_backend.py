"""Which implementation a public kernel function runs, which launch configuration it picks, and
the one place every Triton kernel is launched from.

``backend="auto"`` (the default everywhere) picks Triton when the tensors live on a CUDA device and
the chunked PyTorch path otherwise, so the same call works on a CPU-only machine without ever
materialising full logits. ``FASTEBM_KERNEL_BACKEND=triton|torch`` overrides ``auto``; tests force
``backend="triton"`` on the CPU to run the kernels under ``TRITON_INTERPRET=1``.

``launch(kernel, grid, *args, **kwargs)`` is ``kernel[grid](*args, **kwargs)``, except inside
``capture_launches(arch)``: there it records the launch instead of running it, and
``device_arch`` answers ``arch`` for every device. The compile gate (``fastebm doctor --compile``)
calls the real launch wrappers on meta tensors of the tiny / 2B / 7B shapes inside that context,
so it compiles exactly the kernels, constexprs and launch options the wrappers would choose on an
sm_80 or sm_90 GPU, without one.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "torch")
# Architectures with a launch-configuration table: sm_8x (Ampere/Ada) and sm_90+ (Hopper and later).
ARCHS = ("sm80", "sm90")


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


# --------------------------------------------------------------------------------------------- #
# Launch capture (the compile gate) and the architecture a launch configuration is chosen for
# --------------------------------------------------------------------------------------------- #


@dataclass
class Launch:
    """One recorded launch: the @triton.jit kernel, its grid, positional and keyword arguments."""
    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict


_CAPTURE: contextvars.ContextVar[Optional[tuple[str, list]]] = contextvars.ContextVar("fastebm_capture",
                                                                                    default=None)


@contextlib.contextmanager
def capture_launches(arch: str) -> Iterator[list]:
    """Record (not run) every ``launch`` in this context, as if on a GPU of ``arch`` ("sm80" | "sm90")."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    launches: list = []
    token = _CAPTURE.set((arch, launches))
    try:
        yield launches
    finally:
        _CAPTURE.reset(token)


def capturing() -> bool:
    return _CAPTURE.get() is not None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; recorded instead inside ``capture_launches``."""
    cap = _CAPTURE.get()
    if cap is not None:
        cap[1].append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def arch_of_capability(major: int, minor: int = 0) -> str:
    """The table an sm_<major><minor> GPU uses: sm_90 and newer -> "sm90", anything older -> "sm80"
    (the sm80 entries keep shared memory within the 99 KiB of sm_86 / sm_89 too)."""
    del minor
    return "sm90" if major >= 9 else "sm80"


def device_arch(device: torch.device) -> str:
    """"interpret" under TRITON_INTERPRET (small tiles for numpy), the captured arch inside
    ``capture_launches``, else the CUDA device's table ("sm80" | "sm90")."""
    cap = _CAPTURE.get()
    if cap is not None:
        return cap[0]
    if triton_interpreted():
        return "interpret"
    return arch_of_capability(*torch.cuda.get_device_capability(device))
