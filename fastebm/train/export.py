"""``fastebm export CHECKPOINT_DIR OUT_DIR``: a checkpoint as a Hugging Face model directory.

A sharded (``dcp``) checkpoint is consolidated on one process, without a process group: the model
is built from the checkpoint's config.json on the meta device, materialised empty on the CPU in the
dtype it was trained in, filled by Distributed Checkpoint (which reads every rank's shards) and
saved with ``save_pretrained`` (safetensors), next to the tokenizer and generation config. An ``hf``
checkpoint is already such a directory: its model files are copied. Either way
``AutoModelForImageTextToText.from_pretrained(OUT_DIR)`` loads the result.

Memory: the full model once in host memory (bf16 7B: 15.2 GiB; float32 master weights: 30.5 GiB).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

from fastebm.train.checkpoint import META, STATE, CheckpointError, checkpoint_format


def export_checkpoint(checkpoint: str, out_dir: str) -> str:
    checkpoint, out_dir = os.path.expanduser(checkpoint), os.path.expanduser(out_dir)
    if not os.path.isfile(os.path.join(checkpoint, META)):
        raise CheckpointError(f"{checkpoint}: not a complete fastebm checkpoint ({META} missing)")
    if os.path.abspath(checkpoint) == os.path.abspath(out_dir):
        raise CheckpointError(f"{out_dir}: the output directory must differ from the checkpoint")
    os.makedirs(out_dir, exist_ok=True)
    if checkpoint_format(checkpoint) == "hf":
        for name in os.listdir(checkpoint):
            if name not in (META, STATE) and os.path.isfile(os.path.join(checkpoint, name)):
                shutil.copy2(os.path.join(checkpoint, name), os.path.join(out_dir, name))
        return out_dir

    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

    with open(os.path.join(checkpoint, META)) as f:
        dtype = getattr(torch, json.load(f).get("dtype", "float32"))
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    state = model.state_dict()  # FQN -> tensor, the keys the trainer's get_state_dict wrote
    with warnings.catch_warnings():  # DCP warns that it "assumes the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=checkpoint, no_dist=True)  # every shard, here, alone
    model.load_state_dict(state)
    # Non-persistent buffers (rotary inverse frequencies) are not saved: from_pretrained recomputes them.
    model.save_pretrained(out_dir, safe_serialization=True)
    if os.path.isfile(os.path.join(checkpoint, "generation_config.json")):
        GenerationConfig.from_pretrained(checkpoint).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out_dir)
    return out_dir

