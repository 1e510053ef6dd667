"""Checkpoints: ``run.output_dir/checkpoints/<step>/``, in one of two formats (``meta.json: format``).

``hf`` (single process): the policy as a Hugging Face model directory (safetensors + config +
tokenizer, so ``from_pretrained`` loads it), ``trainer_state.pt`` (optimizer, scheduler, RNG, data
position) and ``meta.json`` (step, run fingerprint).

``dcp`` (world size > 1): the policy's and the optimizer's sharded state written by Distributed
Checkpoint, every rank its own shards (``*.distcp`` + ``.metadata``), with config.json, the tokenizer,
``trainer_state.pt`` (scheduler, data position, RNG; no optimizer), per-rank RNG states under ``rng/``
and ``meta.json``. DCP reshards on load, so it resumes on any world size, one process included;
``fastebm export`` turns it into a Hugging Face directory. A 1-process ``hf`` checkpoint also resumes on
many ranks (weights through ``from_pretrained``, the optimizer state sharded on load).

Both are written into a temporary directory and renamed into place: the rename is the commit, so a
crash (or a rank dying) mid-save leaves the previous checkpoint as the newest complete one.
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


def resolve_resume(resume: str, run_dir: str) -> Optional[str]:
    """``train.resume``: ``false`` -> None; ``true`` -> the newest checkpoint of ``run_dir`` (None, with
    a warning, when there is none); anything else -> that checkpoint directory, which must exist."""
    if resume.lower() == "false":
        return None
    if resume.lower() == "true":
        path = latest_checkpoint(run_dir)
        if path is None:
            import logging

            logging.getLogger("fastebm").warning("train.resume = true but %s has no checkpoint: starting from "
                                                 "scratch", run_dir)
        return path
    path = os.path.expanduser(resume)
    if not os.path.isdir(path):
        raise CheckpointError(f"train.resume: checkpoint directory {path!r} does not exist")
    return path


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
        json.dump({"step": step, "fingerprint": fp, "format": "hf"}, f, indent=1)
    _commit(tmp, final)
    if keep > 0:
        for _, path in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def checkpoint_format(path: str) -> str:
    """``hf`` or ``dcp`` (checkpoints written before the field existed are ``hf``)."""
    with open(os.path.join(path, META)) as f:
        return json.load(f).get("format", "hf")


def hf_weights_dir(path: Optional[str]) -> Optional[str]:
    """``path`` when it holds ``from_pretrained`` weights (an ``hf`` checkpoint), else None."""
    if path and os.path.isfile(os.path.join(path, META)) and checkpoint_format(path) == "hf":
        return path
    return None


def _commit(tmp: str, final: str) -> None:
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it whole
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_sharded_checkpoint(run_dir: str, step: int, model, optimizer, tokenizer, trainer_state: dict, fp: dict,
                            d, keep: int = 0) -> str:
    """Collective: every rank writes its shards with DCP; rank 0 writes the rest and commits.

    ``run_dir`` must be on storage every rank sees (one node's disk, or a shared filesystem).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, str(step))
    tmp = os.path.join(root, f".tmp-{step}")  # the same name on every rank
    if d.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    d.barrier()
    d.reshard(model)  # the state dict must see the sharded parameters (the optimizer's)
    msd, osd = get_state_dict(model, optimizer)  # sharded (DTensor) state, keyed by parameter FQN
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, "rng", f"{d.rank}.pt"))
    d.barrier()  # every shard is on disk before rank 0 commits
    if d.is_main:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({**trainer_state, "rng": rng_state()}, os.path.join(tmp, STATE))
        dtype = str(next(iter(msd.values())).dtype).replace("torch.", "")
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"step": step, "fingerprint": fp, "format": "dcp", "world_size": d.world_size,
                       "dtype": dtype}, f, indent=1)
        _commit(tmp, final)
        if keep > 0:
            for _, path in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    d.barrier()
    return final


def load_sharded_weights(path: str, model, optimizer=None) -> None:
    """Load a ``dcp`` checkpoint into ``model`` (sharded or not) and optionally ``optimizer``.

    DCP reads each rank's slice of every tensor whatever the world size that wrote it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        msd = get_model_state_dict(model)
        dcp.load({"model": msd}, checkpoint_id=path)
        set_model_state_dict(model, msd)
        return
    msd, osd = get_state_dict(model, optimizer)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def rank_rng_state(path: str, rank: int, world_size: int) -> Optional[dict]:
    """Rank ``rank``'s RNG state in a ``dcp`` checkpoint (``rng/<rank>.pt``), or None when the
    checkpoint was written by another world size (its ranks are not this job's) or has none."""
    with open(os.path.join(path, META)) as f:
        written_by = json.load(f).get("world_size", 1)
    rank_file = os.path.join(path, "rng", f"{rank}.pt")
    if written_by != world_size or not os.path.isfile(rank_file):
        return None
    return torch.load(rank_file, weights_only=False)


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """An ``hf`` checkpoint's (1-process, index-keyed) optimizer state into a sharded optimizer.

    The index of a parameter in the optimizer is its position among the model's trainable
    parameters (how the trainer builds the optimizer); the FQN-keyed full state is then sharded.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    fqns = [n for n, p in model.named_parameters() if p.requires_grad]
    full = {"state": {fqns[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


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
    state["format"] = meta.get("format", "hf")
    state["world_size"] = meta.get("world_size", 1)
    return state
