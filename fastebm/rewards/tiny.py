"""Tiny random reward models for the CPU demo and tests, built once and loaded like real ones.

Like the tiny policy (fastebm.model.loading), each is written once into ``model.tiny_cache_dir``
(atomically: built in a temporary folder, then renamed) and then loaded through the same code as a
real model: the BERT encoder with ``from_pretrained``, the CLIP model with open_clip from a model
config JSON and a weights file.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

TINY_BERT_VERSION = 1
TINY_CLIP_VERSION = 1
TINY_CLIP_NAME = "fastebm-tiny-clip"


def _atomic_build(path: str, build) -> str:
    if os.path.isfile(os.path.join(path, ".complete")):
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    build(tmp)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write("ok\n")
    try:
        os.replace(tmp, path)
    except OSError:  # a concurrent builder won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny_bert(cache_dir: str, seed: int = 0) -> str:
    """A 2-layer BERT (hidden 32) with a WordPiece vocabulary trained on the sample corpus."""
    path = os.path.join(os.path.expanduser(cache_dir), f"tiny-bert-v{TINY_BERT_VERSION}-seed{seed}")

    def build(out):
        from tokenizers import BertWordPieceTokenizer
        from transformers import BertConfig, BertModel, BertTokenizerFast

        from fastebm.data.sample import sample_corpus

        wp = BertWordPieceTokenizer(lowercase=True)
        wp.train_from_iterator(sample_corpus(), vocab_size=800, show_progress=False)
        wp.save_model(out)
        BertTokenizerFast(os.path.join(out, "vocab.txt"), do_lower_case=True, model_max_length=128).save_pretrained(out)
        cfg = BertConfig(vocab_size=wp.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            BertModel(cfg).save_pretrained(out, safe_serialization=True)

    return _atomic_build(path, build)


def tiny_clip_config(image_size: int = 224) -> dict:
    """An open_clip model config: 1-layer ViT (width 32, patch 32) and 1-layer text tower, CLIP's BPE vocabulary."""
    return {"embed_dim": 32,
            "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def ensure_tiny_clip(cache_dir: str, image_size: int = 224, seed: int = 0) -> tuple[str, str]:
    """``(config JSON path, weights path)`` of a tiny random open_clip model (see ``load_clip``)."""
    name = f"tiny-clip-v{TINY_CLIP_VERSION}-{image_size}px-seed{seed}"
    path = os.path.join(os.path.expanduser(cache_dir), name)
    cfg_file, weights = os.path.join(path, f"{TINY_CLIP_NAME}.json"), os.path.join(path, "open_clip_model.safetensors")

    def build(out):
        import open_clip
        from safetensors.torch import save_file

        cfg = tiny_clip_config(image_size)
        with open(os.path.join(out, f"{TINY_CLIP_NAME}.json"), "w") as f:
            json.dump(cfg, f)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.CLIP(**cfg)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out, "open_clip_model.safetensors"))

    _atomic_build(path, build)
    return cfg_file, weights
