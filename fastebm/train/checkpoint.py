"""Checkpoints: ``run.output_dir/checkpoints/<step>/``.

Each holds the policy as a Hugging Face model directory (safetensors + config + tokenizer, so
``from_pretrained`` loads it), ``trainer_state.pt`` (optimizer, scheduler, RNG, data position) and
``meta.json`` (step, run fingerprint). A checkpoint is written into a temporary directory and
renamed into place: the rename is the commit, so a crash mid-save leaves the previous checkpoint as
the newest complete one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch

META = "meta.json"
STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    pass


def fingerprint(model_config: dict, num_records: int) -> dict:
    """What must match for a checkpoint to belong to this run: the architecture and the data size."""
    arch = json.dumps({k: v for k, v in sorted(model_config.items())
                       if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype",
                                    "architectures", "use_cache")}, sort_keys=True, default=str)
    return {"model_config_sha": hashlib.sha256(arch.encode()).hexdigest()[:16], "num_records": num_records}


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.isdigit() and os.path.isfile(os.path.join(path, META)):
            out.append((int(name), path))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    cks = list_checkpoints(run_dir)
    return cks[-1][1] if cks else None


def save_checkpoint(run_dir: str, step: int, model, tokenizer, trainer_state: dict, fp: dict,
                    keep: int = 0) -> str:
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, str(step))
    tmp = os.path.join(root, f".tmp-{step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({**trainer_state, "rng": rng_state()}, os.path.join(tmp, STATE))
    with open(os.path.join(tmp, META), "w") as f:
        json.dump({"step": step, "fingerprint": fp}, f, indent=1)
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it whole
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep > 0:
        for _, path in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str, fp: dict) -> dict:
    """Trainer state of checkpoint ``path`` after checking it belongs to this run (the weights are
    loaded by the caller with ``from_pretrained``)."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: not a complete fastebm checkpoint ({META} missing)")
    with open(meta_path) as f:
        meta = json.load(f)
    for k, v in fp.items():
        if meta.get("fingerprint", {}).get(k) != v:
            raise CheckpointError(
                f"{meta_path}: field 'fingerprint.{k}' is {meta.get('fingerprint', {}).get(k)!r} but this run "
                f"has {v!r}: the checkpoint comes from a different run (model or data); refusing to resume")
    state = torch.load(os.path.join(path, STATE), weights_only=False)
    state["step"] = meta["step"]
    return state
