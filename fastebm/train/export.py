"""``fastebm export CHECKPOINT_DIR OUT_DIR``: a checkpoint as a Hugging Face model directory.

A sharded (``dcp``) checkpoint is consolidated on one process, without a process group: the model
is built from the checkpoint's config.json on the meta device, materialised empty on the CPU in the
dtype it was trained in, filled by Distributed Checkpoint (which reads every rank's shards) and
saved with ``save_pretrained`` (safetensors), next to the tokenizer and generation config. An ``hf``
checkpoint is already such a directory: its model files are copied. Either way
``AutoModelForImageTextToText.from_pretrained(OUT_DIR)`` loads the result.

The checkpoint is verified first (``verify_checkpoint``: every file's size and SHA-256) and nothing
in it is unpickled: DCP's ``.metadata`` goes through the allow-listed reader of
``fastebm.train.safe_io``. A checkpoint of fastebm <= 0.1 has no checksums: it is exported (its
weights read the same safe way) with a warning.

Memory: the full model once in host memory (bf16 7B: 15.2 GiB; float32 master weights: 30.5 GiB).
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings

import torch

from fastebm.train.checkpoint import (LEGACY_STATE, META, STATE, CheckpointError, LegacyCheckpointError, load_dcp,
                                      read_meta, verify_checkpoint)

log = logging.getLogger("fastebm")

_NOT_MODEL_FILES = (META, LEGACY_STATE, STATE + ".json", STATE + ".safetensors")


def export_checkpoint(checkpoint: str, out_dir: str) -> str:
    checkpoint, out_dir = os.path.expanduser(checkpoint), os.path.expanduser(out_dir)
    if not os.path.isfile(os.path.join(checkpoint, META)):
        raise CheckpointError(f"{checkpoint}: not a complete fastebm checkpoint ({META} missing)")
    if os.path.abspath(checkpoint) == os.path.abspath(out_dir):
        raise CheckpointError(f"{out_dir}: the output directory must differ from the checkpoint")
    try:
        meta = verify_checkpoint(checkpoint)
    except LegacyCheckpointError:
        meta = read_meta(checkpoint)
        log.warning("%s: a checkpoint of fastebm <= 0.1, without checksums: exporting its weights unverified "
                    "(nothing in it is unpickled)", checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    if meta.get("format", "hf") == "hf":
        for name in os.listdir(checkpoint):
            if name not in _NOT_MODEL_FILES and os.path.isfile(os.path.join(checkpoint, name)):
                shutil.copy2(os.path.join(checkpoint, name), os.path.join(out_dir, name))
        return out_dir

    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

    dtype = meta.get("dtype", "float32")
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise CheckpointError(f"{os.path.join(checkpoint, META)}: field 'dtype' = {dtype!r} is not a torch dtype")
    dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    state = model.state_dict()  # FQN -> tensor, the keys the trainer's get_state_dict wrote
    with warnings.catch_warnings():  # DCP warns that it "assumes the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_dcp({"model": state}, checkpoint, no_dist=True)  # every shard, here, alone; no pickle
    model.load_state_dict(state)
    # Non-persistent buffers (rotary inverse frequencies) are not saved: from_pretrained recomputes them.
    model.save_pretrained(out_dir, safe_serialization=True)
    if os.path.isfile(os.path.join(checkpoint, "generation_config.json")):
        GenerationConfig.from_pretrained(checkpoint).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out_dir)
    return out_dir

