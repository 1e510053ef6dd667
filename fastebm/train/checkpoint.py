"""Checkpoints: ``run.output_dir/checkpoints/<step>/``, in one of two formats (``meta.json: format``).

``hf`` (single process): the policy as a Hugging Face model directory (safetensors + config +
tokenizer, so ``from_pretrained`` loads it), the trainer state (optimizer, scheduler, RNG, data
position, counters) as ``trainer_state.json`` + ``trainer_state.safetensors``, and ``meta.json``.

``dcp`` (world size > 1): the policy's and the optimizer's sharded state written by Distributed
Checkpoint, every rank its own shards (``*.distcp`` + ``.metadata``), with config.json, the tokenizer,
the trainer state (scheduler, data position, counters, rank 0's RNG; no optimizer), each rank's RNG
under ``rng/<rank>.{json,safetensors}`` and ``meta.json``. DCP reshards on load, so it resumes on any
world size, one process included; ``fastebm export`` turns it into a Hugging Face directory. A
1-process ``hf`` checkpoint also resumes on many ranks (the optimizer state is sharded on load).

Nothing is unpickled (``fastebm.train.safe_io``): the trainer state is JSON + safetensors, DCP's
``.metadata`` is read by an allow-listed unpickler and its non-tensor items weights-only. A checkpoint
of fastebm <= 0.1 (``trainer_state.pt``, a pickle) is refused with the command that converts a
trusted one (``fastebm convert-checkpoint DIR --trusted``).

``meta.json`` (``version`` 2) holds the step, the format, the run's fingerprint and ``files``: every
other file's size and SHA-256. It is written last, once every file has been hashed and flushed to
disk, into a temporary ``.tmp-<step>[-<pid>]`` directory that is then renamed into place: the rename
is the commit, so a crash (or a rank dying) mid-save leaves the previous checkpoint as the newest
complete one. ``verify_checkpoint`` checks all of it; ``resolve_resume`` skips a bad newest
checkpoint (naming the file and the reason) for the previous good one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from typing import Optional

import numpy as np
import torch

from fastebm.config import ConfigError
from fastebm.train.safe_io import UnsafeCheckpointError, dcp_load, load_tree, read_dcp_metadata, save_tree

log = logging.getLogger("fastebm")

META = "meta.json"
STATE = "trainer_state"            # trainer_state.json + trainer_state.safetensors
LEGACY_STATE = "trainer_state.pt"  # fastebm <= 0.1: a pickle, never read
VERSION = 2
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    pass


class LegacyCheckpointError(CheckpointError):
    """A checkpoint in the pickle format of fastebm <= 0.1: converted on request, never loaded."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, folder not writable, a rank's shard write failed)."""


def _write_errors() -> tuple:
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


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
    """(step, path) of every committed checkpoint of ``run_dir`` (numbered folders with a ``meta.json``),
    oldest first."""
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


# ----------------------------------------------------------------------------------------------
# Integrity: meta.json's file list, checked on resume and export
# ----------------------------------------------------------------------------------------------


def _hash_file(path: str) -> dict:
    """Size and SHA-256 of a file, flushed to disk first (the commit must not outrun the data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        while True:
            block = f.read(1 << 24)
            if not block:
                break
            h.update(block)
        size = f.tell()
    return {"size": size, "sha256": h.hexdigest()}


def _files(root: str) -> list[str]:
    """Every file under ``root`` but meta.json, as paths relative to it."""
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if rel != META:
                out.append(rel)
    return sorted(out)


def file_manifest(root: str, rels: list[str]) -> dict:
    return {rel: _hash_file(os.path.join(root, rel)) for rel in rels}


def read_meta(path: str) -> dict:
    """``path/meta.json``; CheckpointError naming it when it is missing or not a JSON object."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path}: missing: {path} is not a complete fastebm checkpoint")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e}): the file is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_path}: not a fastebm checkpoint's meta.json (no integer 'step')")
    return meta


def legacy_message(path: str) -> str:
    return (f"{path}: written by fastebm <= 0.1: its {LEGACY_STATE} (and rng/*.pt) are pickles, which can run "
            f"code when loaded, so fastebm no longer reads them. If you trust this checkpoint (your own run, on your "
            f"own disk), convert it once with: fastebm convert-checkpoint {path} --trusted")


def _refuse_legacy(path: str, meta: dict) -> None:
    if meta.get("version") != VERSION or os.path.exists(os.path.join(path, LEGACY_STATE)):
        raise LegacyCheckpointError(legacy_message(path))


def verify_checkpoint(path: str) -> dict:
    """Check checkpoint ``path`` against its meta.json (every listed file present, its size and its
    SHA-256); returns the meta. CheckpointError names the file and what is wrong with it."""
    meta = read_meta(path)
    _refuse_legacy(path, meta)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{os.path.join(path, META)}: field 'files' is missing or empty")
    for rel, want in sorted(files.items()):
        f = os.path.join(path, rel)
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: missing (meta.json lists it)")
        size = os.path.getsize(f)
        if size != want.get("size"):
            raise CheckpointError(f"{f}: {size} bytes, but meta.json says {want.get('size')} (truncated or "
                                  f"overwritten)")
        if _hash_file(f)["sha256"] != want.get("sha256"):
            raise CheckpointError(f"{f}: SHA-256 differs from meta.json's: the file changed after it was written")
    return meta


# ----------------------------------------------------------------------------------------------
# Which checkpoint to resume, and what else the folder may hold
# ----------------------------------------------------------------------------------------------


def resolve_resume(resume: str, run_dir: str, start_over: bool = False) -> Optional[str]:
    """The checkpoint to resume (verified), after checking that ``run_dir`` holds no other run's.

    ``train.resume``: ``false`` -> None; ``true`` -> the newest checkpoint of ``run_dir`` that verifies
    (a bad newer one is named with a warning and skipped; None, with a warning, when there is none);
    anything else -> that checkpoint directory, which must verify.

    Checkpoints that would mix with this run: any, for a fresh run; those newer than the resume
    point, for a resumed one (a bad one just skipped excepted: this run's save of that step replaces
    it). With ``start_over`` they are deleted; without, ConfigError says what to do.
    """
    skipped: list[str] = []
    if resume.lower() == "false":
        path = None
    elif resume.lower() == "true":
        path = None
        candidates = list_checkpoints(run_dir)
        problems = []
        for _, cand in reversed(candidates):
            try:
                verify_checkpoint(cand)
            except LegacyCheckpointError:
                raise
            except CheckpointError as e:
                log.warning("checkpoint %s is unusable: %s; trying the previous one", cand, e)
                problems.append(str(e))
                skipped.append(cand)
                continue
            path = cand
            break
        if path is None and candidates:
            raise CheckpointError(f"train.resume = true but no checkpoint of {run_dir} is usable: "
                                  + "; ".join(problems))
        if path is None:
            log.warning("train.resume = true but %s has no checkpoint: starting from scratch", run_dir)
    else:
        path = os.path.expanduser(resume)
        if not os.path.isdir(path):
            raise CheckpointError(f"train.resume: checkpoint directory {path!r} does not exist")
        verify_checkpoint(path)
    _check_other_checkpoints(run_dir, path, start_over, skipped)
    return path


def _check_other_checkpoints(run_dir: str, resume_from: Optional[str], start_over: bool, skipped: list[str]) -> None:
    def same(a, b):
        return b is not None and os.path.realpath(a) == os.path.realpath(b)

    others = [(s, p) for s, p in list_checkpoints(run_dir) if not same(p, resume_from)]
    if resume_from is None:
        conflicts = others
    else:
        step = read_meta(resume_from)["step"]
        conflicts = [(s, p) for s, p in others if s > step and not any(same(p, k) for k in skipped)]
    if not conflicts:
        return
    names = ", ".join(p for _, p in conflicts)
    if start_over:
        log.warning("run.start_over = true: deleting the checkpoints of an earlier run: %s", names)
        for _, p in conflicts:
            shutil.rmtree(p)
        return
    if resume_from is None:
        raise ConfigError(
            f"run.output_dir {run_dir} holds checkpoints of an earlier run ({names}); a new run there would mix with "
            f"them (train.resume = true would later pick theirs). Continue that run with train.resume=true, choose "
            f"another run.output_dir, or start over with run.start_over=true (deletes those checkpoints)")
    raise ConfigError(
        f"run.output_dir {run_dir} holds checkpoints newer than the one this run resumes from ({resume_from}): "
        f"{names}; continuing would mix two runs. Resume from the newest (train.resume=true), or set "
        f"run.start_over=true to delete the newer ones")


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete what interrupted saves left in ``checkpoints/`` (``.tmp-*`` and ``*.old-*`` folders).

    Call it holding the run folder's lock: no other process can be writing them.
    """
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    gone = []
    for name in sorted(os.listdir(root)):
        if name.startswith(TMP_PREFIX) or ".old-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            gone.append(name)
    if gone:
        log.warning("removed %d folder(s) left in %s by an interrupted save: %s", len(gone), root, ", ".join(gone))
    return gone


def prune(run_dir: str, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (the one just written among them); never
    one of a later step."""
    if keep <= 0:
        return
    older = [p for s, p in list_checkpoints(run_dir) if s < step]
    for path in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _write_meta(tmp: str, meta: dict) -> None:
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str, step: int, model, tokenizer, trainer_state: dict, fp: dict,
                    keep: int = 0) -> str:
    """Write the ``hf`` checkpoint of ``step``; CheckpointWriteError (nothing left behind) when it fails."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, str(step))
    tmp = os.path.join(root, f"{TMP_PREFIX}{step}-{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_tree(os.path.join(tmp, STATE), {**trainer_state, "rng": rng_state()})
        _write_meta(tmp, {"version": VERSION, "step": step, "fingerprint": fp, "format": "hf",
                          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": file_manifest(tmp, _files(tmp))})
        _commit(tmp, final)
    except _write_errors() as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"the checkpoint of step {step} could not be written to {root}: {_reason(e)}") from e
    prune(run_dir, step, keep)
    return final


def checkpoint_format(path: str) -> str:
    """``hf`` or ``dcp``."""
    return read_meta(path).get("format", "hf")


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
    fd = os.open(os.path.dirname(final), os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded_checkpoint(run_dir: str, step: int, model, optimizer, tokenizer, trainer_state: dict, fp: dict,
                            d, keep: int = 0) -> str:
    """Collective: every rank writes its shards with DCP; rank 0 writes the rest and commits.

    ``run_dir`` must be on storage every rank sees (one node's disk, or a shared filesystem). Every
    rank hashes the files it wrote (its shards, its RNG state) and rank 0 the rest, so the manifest
    costs one pass over each rank's own data. A failure on any rank fails the save on every rank
    (CheckpointWriteError, the temporary folder removed): three agreements (object all-gathers).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, str(step))
    tmp = os.path.join(root, f"{TMP_PREFIX}{step}")  # the same name on every rank

    def agree(err: Optional[str]) -> None:
        errors = [e for e in d.all_gather_object(err) if e]
        if errors:
            if d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(f"the checkpoint of step {step} could not be written to {root}: {errors[0]}")

    err = None
    if d.is_main:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
        except OSError as e:
            err = _reason(e)
    agree(err)
    d.reshard(model)  # the state dict must see the sharded parameters (the optimizer's)
    msd, osd = get_state_dict(model, optimizer)  # sharded (DTensor) state, keyed by parameter FQN
    err, mine = None, {}
    try:
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
        rng = [os.path.relpath(p, tmp) for p in save_tree(os.path.join(tmp, "rng", str(d.rank)), rng_state())]
        mine = file_manifest(tmp, rng + [r for r in _files(tmp) if r.startswith(f"__{d.rank}_")])
    except (*_write_errors(), CheckpointException) as e:
        err = f"rank {d.rank}: {_reason(e)}"
    parts = d.all_gather_object((err, mine))  # every shard is on disk (or failed) before rank 0 commits
    agree_err = next((e for e, _ in parts if e), None)
    if agree_err:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"the checkpoint of step {step} could not be written to {root}: {agree_err}")
    err = None
    if d.is_main:
        try:
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            save_tree(os.path.join(tmp, STATE), {**trainer_state, "rng": rng_state()})
            files = {k: v for _, m in parts for k, v in m.items()}
            files.update(file_manifest(tmp, [r for r in _files(tmp) if r not in files]))
            dtype = str(next(iter(msd.values())).dtype).replace("torch.", "")
            _write_meta(tmp, {"version": VERSION, "step": step, "fingerprint": fp, "format": "dcp",
                              "world_size": d.world_size, "dtype": dtype,
                              "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files})
            _commit(tmp, final)
        except _write_errors() as e:
            err = _reason(e)
    agree(err)  # also: no rank runs ahead of the commit
    if d.is_main:
        prune(run_dir, step, keep)
    return final


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def load_dcp(state: dict, path: str, **kwargs) -> None:
    """``safe_io.dcp_load``, its failures (a refused or damaged file; DCP wraps them) as CheckpointError.

    ``.metadata`` is read (safely) once first, so a refused one is reported as itself, not as DCP's
    fallback to per-rank metadata files that fastebm never writes.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        read_dcp_metadata(os.path.join(path, ".metadata"))
        dcp_load(state, path, **kwargs)
    except OSError as e:
        raise CheckpointError(f"{path}: the sharded (DCP) checkpoint cannot be loaded: {_reason(e)}") from None
    except (UnsafeCheckpointError, CheckpointException) as e:
        raise CheckpointError(f"{path}: the sharded (DCP) checkpoint cannot be loaded: {_dcp_reason(e)}") from None


def _dcp_reason(e: BaseException) -> str:
    if isinstance(e, UnsafeCheckpointError):
        return str(e)
    failures = getattr(e, "failures", None) or {}
    for f in failures.values():  # {rank: exception}: the first rank's own error says what happened
        inner = f[0] if isinstance(f, tuple) else f
        return f"{type(inner).__name__}: {inner}"
    return str(e).splitlines()[0]


def load_sharded_weights(path: str, model, optimizer=None) -> None:
    """Load a ``dcp`` checkpoint into ``model`` (sharded or not) and optionally ``optimizer``.

    DCP reads each rank's slice of every tensor whatever the world size that wrote it; the metadata
    and the non-tensor items are read without pickle's code paths (``safe_io``).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        msd = get_model_state_dict(model)
        load_dcp({"model": msd}, path)
        set_model_state_dict(model, msd)
        return
    msd, osd = get_state_dict(model, optimizer)
    load_dcp({"model": msd, "optimizer": osd}, path)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def _load_state_tree(prefix: str):
    try:
        return load_tree(prefix)
    except OSError as e:
        raise CheckpointError(f"{e.filename or prefix}: cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def rank_rng_state(path: str, rank: int, world_size: int) -> Optional[dict]:
    """Rank ``rank``'s RNG state in a ``dcp`` checkpoint (``rng/<rank>``), or None when the checkpoint
    was written by another world size (its ranks are not this job's) or has none."""
    written_by = read_meta(path).get("world_size", 1)
    prefix = os.path.join(path, "rng", str(rank))
    if written_by != world_size or not os.path.isfile(prefix + ".json"):
        return None
    return _load_state_tree(prefix)


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
    loaded by the caller: ``from_pretrained`` or ``load_sharded_weights``)."""
    meta = read_meta(path)
    _refuse_legacy(path, meta)
    for k, v in fp.items():
        if meta.get("fingerprint", {}).get(k) != v:
            raise CheckpointError(
                f"{os.path.join(path, META)}: field 'fingerprint.{k}' is {meta.get('fingerprint', {}).get(k)!r} but "
                f"this run has {v!r}: the checkpoint comes from a different run (model or data); refusing to resume")
    state = _load_state_tree(os.path.join(path, STATE))
    state["step"] = meta["step"]
    state["format"] = meta.get("format", "hf")
    state["world_size"] = meta.get("world_size", 1)
    return state


# ----------------------------------------------------------------------------------------------
# Old checkpoints
# ----------------------------------------------------------------------------------------------


def convert_legacy_checkpoint(path: str) -> list[str]:
    """Rewrite a TRUSTED fastebm <= 0.1 checkpoint in the current format, in place; returns what changed.

    This unpickles ``trainer_state.pt`` and ``rng/*.pt`` (``torch.load(weights_only=False)``), which
    runs whatever code they hold: only for checkpoints you wrote yourself. The new files are written
    first and meta.json (with the file list) last, so an interrupted conversion can be run again.
    """
    meta = read_meta(path)
    if meta.get("version") == VERSION and not os.path.exists(os.path.join(path, LEGACY_STATE)):
        raise CheckpointError(f"{path}: already in the current checkpoint format (meta.json version {VERSION})")
    changed = []
    legacy = os.path.join(path, LEGACY_STATE)
    if os.path.isfile(legacy):
        save_tree(os.path.join(path, STATE), torch.load(legacy, weights_only=False))
        changed.append(LEGACY_STATE)
    rng_dir = os.path.join(path, "rng")
    for name in sorted(os.listdir(rng_dir)) if os.path.isdir(rng_dir) else []:
        if name.endswith(".pt"):
            save_tree(os.path.join(rng_dir, name[:-3]), torch.load(os.path.join(rng_dir, name), weights_only=False))
            changed.append(f"rng/{name}")
    if not os.path.isfile(os.path.join(path, STATE + ".json")):
        raise CheckpointError(f"{path}: has neither {LEGACY_STATE} nor {STATE}.json: not a fastebm checkpoint")
    for rel in changed:
        os.remove(os.path.join(path, rel))
    meta.update(version=VERSION, files=file_manifest(path, _files(path)))
    tmp = os.path.join(path, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(path, META))
    return changed
