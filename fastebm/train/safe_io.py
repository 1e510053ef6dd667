"""Checkpoint files read without running their code: no pickle from a file fastebm did not just write.

A checkpoint may come from someone else (a shared folder, a download), so nothing read from it may
execute code. Two kinds of file used to be pickles:

- **Trainer state** (optimizer, scheduler, RNG, sampler position, counters): ``save_tree(path, tree)``
  writes ``<path>.json`` (the structure: dicts, lists, tuples, numbers, strings, None) and
  ``<path>.safetensors`` (every tensor and NumPy array, by name). Neither format can run code;
  ``load_tree`` rebuilds the tree and rejects anything it does not know.
- **Distributed Checkpoint (DCP)**: ``.metadata`` is a pickle written by ``dcp.save``, and DCP's
  default load planner unpickles every non-tensor item (``torch.load(weights_only=False)``).
  ``SafeFileSystemReader`` reads ``.metadata`` with an unpickler that builds only DCP's own metadata
  classes (the allow-list ``DCP_METADATA_GLOBALS``) and ``SafeLoadPlanner`` reads the non-tensor
  items with ``torch.load(weights_only=True)`` (plain containers and numbers). DCP itself reads the
  tensors with ``weights_only=True``. Pass both to ``dcp.load`` (``dcp_load``).

Errors are ``UnsafeCheckpointError`` / ``ValueError`` naming the file; callers turn them into
``CheckpointError``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from typing import Any

import numpy as np
import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something fastebm will not load (it could run code, or is not ours)."""


# ----------------------------------------------------------------------------------------------
# Trainer state: JSON + safetensors
# ----------------------------------------------------------------------------------------------
#
# JSON encoding of the tree (one tag per non-JSON type; a genuine dict whose keys are not all plain
# strings, or start with "$", is written as "$items" so it can never be mistaken for a tag):
#   tuple                      {"$tuple": [...]}
#   dict with other keys       {"$items": [[key, value], ...]}
#   torch.Tensor               {"$tensor": "<name in the .safetensors file>"}
#   numpy.ndarray              {"$ndarray": "<name>", "dtype": "uint32", "shape": [624]}   (raw bytes, uint8)
# Floats keep their exact value (json writes repr; NaN and Infinity as Python's json does).


def save_tree(path: str, tree: Any) -> list[str]:
    """Write ``tree`` as ``path.json`` + ``path.safetensors``; returns the two file paths."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors)
    # safetensors refuses tensors that share memory: a contiguous CPU copy of each is independent.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, path + ".safetensors")
    with open(path + ".json", "w") as f:
        json.dump(encoded, f)
    return [path + ".json", path + ".safetensors"]


def load_tree(path: str) -> Any:
    """The tree ``save_tree(path, ...)`` wrote. ValueError naming the file when it is not such a tree."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(path + ".json") as f:
            encoded = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}.json: not valid JSON ({e})") from None
    try:
        tensors = load_file(path + ".safetensors", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path}.safetensors: not a valid safetensors file ({e})") from None
    return _decode(encoded, tensors, path + ".json")


def _encode(x: Any, tensors: dict) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = x
        return {"$tensor": name}
    if isinstance(x, np.ndarray):
        name = f"t{len(tensors)}"
        raw = np.ascontiguousarray(x)
        tensors[name] = torch.from_numpy(raw.view(np.uint8).reshape(-1).copy())
        return {"$ndarray": name, "dtype": raw.dtype.str, "shape": list(raw.shape)}
    if isinstance(x, np.generic):  # a NumPy scalar: its Python value
        return _encode(x.item(), tensors)
    if isinstance(x, tuple):
        return {"$tuple": [_encode(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _encode(v, tensors) for k, v in x.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in x.items()]}
    raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint's trainer state")


def _decode(x: Any, tensors: dict, where: str) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, list):
        return [_decode(v, tensors, where) for v in x]
    if not isinstance(x, dict):
        raise ValueError(f"{where}: unexpected value {x!r}")
    if len(x) == 1 and "$tuple" in x:
        return tuple(_decode(v, tensors, where) for v in x["$tuple"])
    if len(x) == 1 and "$items" in x:
        return {_hashable(_decode(k, tensors, where), where): _decode(v, tensors, where) for k, v in x["$items"]}
    if len(x) == 1 and "$tensor" in x:
        return _tensor(x["$tensor"], tensors, where)
    if set(x) == {"$ndarray", "dtype", "shape"}:
        raw = _tensor(x["$ndarray"], tensors, where).numpy()
        try:
            return raw.view(np.dtype(x["dtype"])).reshape(x["shape"]).copy()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: array {x['$ndarray']!r} does not match its dtype / shape ({e})") from None
    if any(k.startswith("$") for k in x):
        raise ValueError(f"{where}: unknown entry {sorted(x)!r}")
    return {k: _decode(v, tensors, where) for k, v in x.items()}


def _tensor(name: Any, tensors: dict, where: str) -> torch.Tensor:
    if not isinstance(name, str) or name not in tensors:
        raise ValueError(f"{where}: refers to tensor {name!r}, which the .safetensors file does not hold")
    return tensors[name]


def _hashable(k: Any, where: str) -> Any:
    if isinstance(k, (list, dict)):
        raise ValueError(f"{where}: a table key is a {type(k).__name__}")
    return k


# ----------------------------------------------------------------------------------------------
# Distributed Checkpoint: a restricted .metadata reader and a weights-only planner
# ----------------------------------------------------------------------------------------------

DCP_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # layout by name (torch.strided)
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
})
"""What a DCP ``.metadata`` pickle may build: DCP's metadata dataclasses, ``torch.Size``, layouts,
paths and dtypes (``torch.float32``, ...). Each is data or a constructor of data; nothing else is
ever looked up, so a crafted file cannot reach ``os.system`` or any other callable."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"it refers to {module}.{name}, which DCP metadata never holds")


def read_dcp_metadata(path: str):
    """A DCP ``.metadata`` file through the allow-listed unpickler (UnsafeCheckpointError naming the file)."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path, "rb") as f:
        data = f.read()
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: refusing to load it: {e}") from None
    except Exception as e:  # truncated or garbled: pickle raises many types
        raise UnsafeCheckpointError(f"{path}: not a readable DCP metadata file ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(md).__name__}, not DCP metadata")
    return md


def safe_storage_reader(checkpoint: str):
    """A DCP ``FileSystemReader`` for ``checkpoint`` whose ``read_metadata`` uses ``read_dcp_metadata``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            md = read_dcp_metadata(os.path.join(str(self.path), name))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeFileSystemReader(checkpoint)


def safe_load_planner():
    """DCP's default load planner, reading non-tensor items (optimizer hyper-parameters) weights-only.

    ``DefaultLoadPlanner.load_bytes`` unpickles with ``weights_only=False``; this one is the same
    method with ``weights_only=True`` (plain containers, numbers and strings load; a global refuses).
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(f"item {fqn!r}: refusing to load it: {str(e).splitlines()[0]}") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeLoadPlanner()


def dcp_load(state: dict, checkpoint: str, **kwargs) -> None:
    """``dcp.load(state, ...)`` through ``safe_storage_reader`` and ``safe_load_planner``."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, storage_reader=safe_storage_reader(checkpoint), planner=safe_load_planner(), **kwargs)
