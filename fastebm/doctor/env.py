"""The environment a bug report needs: Python, torch, CUDA and driver, the GPU, and the versions of
every package fastebm's fast paths use (or "not installed")."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys

# (what, distribution names to try): the first one installed is reported.
PACKAGES = [
    ("torch", ["torch"]), ("triton", ["triton"]), ("transformers", ["transformers"]),
    ("flash-attn", ["flash-attn", "flash_attn"]),
    ("DALI", ["nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"]),
    ("PyAV", ["av"]), ("open_clip", ["open_clip_torch", "open-clip-torch"]), ("liger-kernel", ["liger-kernel"]),
    ("trl", ["trl"]), ("numpy", ["numpy"]), ("fastebm", ["fastebm"]),
]


def package_version(names) -> str:
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            continue
    return "not installed"


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """An ordered dict of name -> text (no GPU needed)."""
    import torch

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu cores": str(os.cpu_count())}
    for what, names in PACKAGES:
        env[what] = package_version(names)
    env["torch CUDA build"] = str(torch.version.cuda or "none (CPU build)")
    if torch.cuda.is_available():
        env["CUDA driver"] = _driver_version()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env[f"GPU {i}"] = (f"{p.name}, {p.total_memory / 2 ** 30:.1f} GiB, sm_{p.major}{p.minor}, "
                               f"{p.multi_processor_count} SMs")
    else:
        env["GPU"] = "none visible (torch.cuda.is_available() is False)"
    env["Triton kernels run"] = ("natively (CUDA)" if torch.cuda.is_available() else
                                 "under the interpreter only (TRITON_INTERPRET=1); the CPU fast path is PyTorch")
    return env


def format_environment(env: dict) -> str:
    width = max(len(k) for k in env)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in env.items())
