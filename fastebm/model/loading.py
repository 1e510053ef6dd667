"""Loading the policy and the reference model, and building tiny random models for the CPU demo.

Every model, tiny or real, goes through the same ``from_pretrained`` path: a tiny model is built
once from a config, saved with ``save_pretrained`` (safetensors) under ``model.tiny_cache_dir`` and
loaded back like any local checkpoint. There is no hub access: ``model.path`` is a local directory.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)

# Qwen2-VL's special tokens (names as in the released tokenizers).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat template, reduced to what fastebm renders (system + user with a video + assistant).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_FORMAT_VERSION = 1  # bump when the tiny architecture or tokenizer changes (invalidates the cache)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    family: str  # "qwen2_vl" | "qwen2_5_vl"
    path: str

    @property
    def vision(self):
        return self.model.config.vision_config


def _tiny_corpus(tags=("vision", "think", "answer")) -> list[str]:
    """Text the tiny tokenizer is trained on: the prompt template words and the sample dialogues."""
    from fastebm.data.prompts import SYSTEM_TEMPLATE, USER_TEMPLATE
    from fastebm.data.sample import sample_corpus

    lines = [SYSTEM_TEMPLATE, USER_TEMPLATE] + sample_corpus()
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
    """Build (once) and save a tiny random model + tokenizer; return its directory."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    _quiet_transformers()
    root = os.path.expanduser(cache_dir)
    path = os.path.join(root, f"tiny-{family}-v{TINY_FORMAT_VERSION}-seed{seed}")
    if os.path.isfile(os.path.join(path, ".complete")):
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tokenizer = build_tiny_tokenizer(tmp)
    config = tiny_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[config.text_config.eos_token_id],
                                               pad_token_id=config.text_config.pad_token_id)
    model.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        json.dump({"family": family, "seed": seed}, f)
    try:
        os.replace(tmp, path)  # atomic: concurrent builders race harmlessly
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built tiny random %s model at %s", family, path)
    return path


def _quiet_transformers() -> None:
    """No per-shard progress bars from transformers in the trainer's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


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
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

    _quiet_transformers()
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
    tokenizer = AutoTokenizer.from_pretrained(path)
    if getattr(tokenizer, "chat_template", None) is None:
        try:  # released Qwen checkpoints keep the template with the processor
            from transformers import AutoProcessor

            tokenizer.chat_template = AutoProcessor.from_pretrained(path).chat_template
        except Exception:
            tokenizer.chat_template = CHAT_TEMPLATE
    return LoadedModel(model, tokenizer, family, path)


def resolve_model_path(cfg_model, seed: int = 0) -> str:
    """``model.path`` or, for ``model.tiny``, the (built on first use) tiny model directory."""
    if cfg_model.tiny:
        return ensure_tiny_model(cfg_model.tiny, cfg_model.tiny_cache_dir, seed)
    return os.path.expanduser(cfg_model.path)
