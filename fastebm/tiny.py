"""Tiny random models for the CPU demo and the tests: the policy (Qwen2-VL / Qwen2.5-VL with a
tokenizer trained on the sample corpus), a BERT encoder for BERTScore and an open_clip CLIP model.

Each is built once into ``model.tiny_cache_dir`` (in a temporary folder, then renamed: concurrent
builders race harmlessly) and then loaded through the same code as a real model: the policy and
the BERT encoder with ``from_pretrained``, the CLIP model with open_clip from a model-config JSON
and a weights file. Nothing here is used by a run on real checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

from fastebm.data.prompts import CHAT_TEMPLATE, SPECIAL_TOKENS
from fastebm.utils import build_dir_once, quiet_transformers

log = logging.getLogger(__name__)

TINY_FORMAT_VERSION = 1  # bump when the tiny architecture or tokenizer changes (invalidates the cache)
TINY_BERT_VERSION = 1
TINY_CLIP_VERSION = 1
TINY_CLIP_NAME = "fastebm-tiny-clip"


# The prompt words the tiny tokenizer was first trained on (fastebm's templates before 0.2), kept as they
# were: the tokenizer, and so every tiny model already built under model.tiny_cache_dir, stays the same
# whatever the prompt templates become (they only tokenize into more, shorter pieces).
_CORPUS_PROMPT_TEXT = [
    "You are {assistant} from {data_source}, talking with {user}.\n"
    "Character profile: {profile}\n"
    "Watch the video as {assistant} sees the scene, then reply in character in exactly this format:\n"
    "<{v}> what you see in the scene </{v}>\n<{t}> what you make of it </{t}>\n<{a}> your next line </{a}>",
    "The dialogue so far:\n{history}\nNow reply as {assistant}.",
]


def _tiny_corpus(tags=("vision", "think", "answer")) -> list[str]:
    """Text the tiny tokenizer is trained on: the prompt template words and the sample dialogues."""
    from fastebm.data.sample import sample_corpus

    lines = list(_CORPUS_PROMPT_TEXT) + sample_corpus()
    lines += [f"<{t}>" for t in tags] + [f"</{t}>" for t in tags]
    return lines


def build_tiny_tokenizer(out_dir: Optional[str] = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the sample corpus, with Qwen2-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token=None, bos_token=None)
    # The output tags are single tokens in the tiny tokenizer, so a tiny model can learn the format fast.
    hf.add_tokens([f"<{t}>" for t in ("vision", "think", "answer")] + [f"</{t}>" for t in ("vision", "think", "answer")])
    hf.chat_template = CHAT_TEMPLATE
    if out_dir:
        hf.save_pretrained(out_dir)
    return hf


def tiny_config(family: str, tokenizer):
    """A Qwen2-VL / Qwen2.5-VL config small enough to run generate on video on the CPU in milliseconds."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    if family == "qwen2vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen25vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"model.tiny must be 'qwen2vl' or 'qwen25vl', got {family!r}")


def ensure_tiny_model(family: str, cache_dir: str, seed: int = 0) -> str:
    """Build (once) and save a tiny random Qwen2-VL / Qwen2.5-VL model + tokenizer; return its directory."""
    quiet_transformers()
    path = os.path.join(os.path.expanduser(cache_dir), f"tiny-{family}-v{TINY_FORMAT_VERSION}-seed{seed}")
    if os.path.isfile(os.path.join(path, ".complete")):
        return path

    def build(out):
        from transformers import AutoModelForImageTextToText, GenerationConfig

        tokenizer = build_tiny_tokenizer(out)
        config = tiny_config(family, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        model.generation_config = GenerationConfig(eos_token_id=[config.text_config.eos_token_id],
                                                   pad_token_id=config.text_config.pad_token_id)
        model.save_pretrained(out, safe_serialization=True)

    build_dir_once(path, build, marker_text=json.dumps({"family": family, "seed": seed}))
    log.info("built tiny random %s model at %s", family, path)
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

    return build_dir_once(path, build)


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

    build_dir_once(path, build)
    return cfg_file, weights
