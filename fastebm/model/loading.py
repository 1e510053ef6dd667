"""Loading the policy and the reference model from local directories.

Every model, tiny or real, goes through the same ``from_pretrained`` path: a tiny model
(``model.tiny``) is built once by ``fastebm.tiny``, saved with ``save_pretrained`` under
``model.tiny_cache_dir`` and loaded back like any local checkpoint. There is no hub access:
``model.path`` is a local directory.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from fastebm.data.prompts import CHAT_TEMPLATE
from fastebm.utils import quiet_transformers

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    family: str  # "qwen2_vl" | "qwen2_5_vl"
    path: str

    @property
    def vision(self):
        return self.model.config.vision_config


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(path: str, device: torch.device, dtype="auto", attn_implementation: str = "auto",
               trainable: bool = True, on_meta: bool = False) -> LoadedModel:
    """Load a Qwen2-VL / Qwen2.5-VL checkpoint and its tokenizer from a local directory.

    ``dtype``: a name (``"auto"``: bfloat16 on CUDA, float32 elsewhere) or a ``torch.dtype``.
    ``on_meta``: build the model from the checkpoint's config on the meta device, reading no weights
    (their values come later, from another rank: ``fastebm.train.parallel.parallelize``);
    ``device`` then only resolves ``"auto"``.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    quiet_transformers()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.path: {path!r} is not a local directory (fastebm does not download models)")
    config = AutoConfig.from_pretrained(path)
    family = config.model_type
    if family not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"{path}/config.json: model_type {family!r} is not supported (qwen2_vl, qwen2_5_vl)")
    attn = "sdpa" if attn_implementation == "auto" else attn_implementation
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    if on_meta:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=dt, attn_implementation=attn)
        if os.path.exists(os.path.join(path, "generation_config.json")):  # from_pretrained reads it too
            model.generation_config = GenerationConfig.from_pretrained(path)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dt, attn_implementation=attn)
        model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return LoadedModel(model, load_tokenizer(path), family, path)


def load_tokenizer(path: str):
    """The tokenizer of a local checkpoint, with a chat template (the processor's, else fastebm's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if getattr(tokenizer, "chat_template", None) is None:
        try:  # released Qwen checkpoints keep the template with the processor
            from transformers import AutoProcessor

            tokenizer.chat_template = AutoProcessor.from_pretrained(path).chat_template
        except Exception:
            tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def resolve_model_path(cfg_model, seed: int = 0) -> str:
    """``model.path`` or, for ``model.tiny``, the (built on first use) tiny model directory."""
    if cfg_model.tiny:
        from fastebm.tiny import ensure_tiny_model

        return ensure_tiny_model(cfg_model.tiny, cfg_model.tiny_cache_dir, seed)
    return os.path.expanduser(cfg_model.path)
