"""CLIP scene-text alignment: how well the ``<vision>`` text describes the clip's frames.

open_clip (``rewards.clip.model``, local weights ``rewards.clip.pretrained``; ViT-L/14 in the
flagship recipes). Frames are the clip's CLIP frames, decoded once with the policy's frames
(``VideoSample.clip_frames``: duration rule 4/8/16/32, resized and centre-cropped as CLIP's
processor); their embeddings are computed once per clip and kept in memory and, when
``video.cache_dir`` is set, on disk beside the video cache (keyed by the frames' bytes and the
model), so a clip seen again costs nothing.

Per step, ONE text-tower pass over the batch (every completion's text, or every sentence in
``sentence_topk`` mode) and at most ONE image-tower pass (the step's clips not cached yet):

  * ``max``: max over frames of cos(frame, text), the text truncated to CLIP's 77 tokens;
  * ``sentence_topk``: the text split into sentences (at . ! ? 。！？ and newlines, pieces of more
    than 5 characters that are not bare list numbers; the whole text when none is left); per
    sentence the mean of its top ``max(1, int(K * topk_ratio))`` frame cosines; mean over sentences.

No ``<vision>`` block, or an empty one: 0. Both modes as the reference's CLIP servers.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Optional

import torch

from fastebm.rewards.registry import register
from fastebm.rewards.text import clip_sentences, extract_tag


class ClipModel:
    """An open_clip model and its tokenizer, loaded from a local weights file (never downloaded)."""

    def __init__(self, model: str, pretrained: str, device="cpu"):
        import open_clip

        pretrained = os.path.expanduser(pretrained)
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"rewards.clip.pretrained: {pretrained!r} is not a local weights file "
                                    "(fastebm does not download models)")
        name = model
        if model.endswith(".json"):  # a custom open_clip model config (e.g. the tiny CPU model)
            path = os.path.expanduser(model)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"rewards.clip.model: config file {path!r} not found")
            open_clip.add_model_config(path)
            name = os.path.splitext(os.path.basename(path))[0]
        self.model = open_clip.create_model(name, pretrained=pretrained, device=device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        from fastebm.data.video import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        self.mean = tuple(getattr(self.model.visual, "image_mean", None) or OPENAI_CLIP_MEAN)
        self.std = tuple(getattr(self.model.visual, "image_std", None) or OPENAI_CLIP_STD)
        self.device = device
        st = os.stat(pretrained)
        self.key = hashlib.blake2b(f"{model}|{os.path.realpath(pretrained)}|{st.st_size}|{st.st_mtime_ns}".encode(),
                                   digest_size=8).hexdigest()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(n, D) L2-normalised text embeddings, one text-tower pass (77-token truncation)."""
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()

    @torch.no_grad()
    def encode_frames(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 [K_i, S, S, 3] clips -> per clip (K_i, D) L2-normalised frame embeddings, one image-tower pass."""
        from fastebm.data.video import clip_pixel_values, clip_resize_crop

        xs = []
        for frames in clips:
            if frames is None or frames.dim() != 4 or frames.shape[0] == 0:
                raise ValueError("a clip has no CLIP frames (VideoSample.clip_frames is empty)")
            if frames.shape[1] != self.image_size or frames.shape[2] != self.image_size:
                frames = clip_resize_crop(frames, self.image_size)
            xs.append(clip_pixel_values(frames.to(self.device), self.mean, self.std))
        emb = self.model.encode_image(torch.cat(xs), normalize=True).float()
        return list(emb.split([x.shape[0] for x in xs]))


class FrameEmbeddingCache:
    """Frame embeddings per clip: an in-memory LRU and, with a root folder, ``.pt`` files on disk."""

    def __init__(self, model_key: str, root: str = "", max_items: int = 1024):
        self.model_key, self.max_items = model_key, max_items
        self.root = os.path.join(os.path.expanduser(root), "clip_embeddings", model_key) if root else ""
        self.mem: OrderedDict[str, torch.Tensor] = OrderedDict()

    @staticmethod
    def key(frames: torch.Tensor) -> str:
        t = frames.detach().to("cpu").contiguous()
        h = hashlib.blake2b(digest_size=16)
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
        return h.hexdigest()

    def _file(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key + ".pt")

    def get(self, key: str) -> Optional[torch.Tensor]:
        if key in self.mem:
            self.mem.move_to_end(key)
            return self.mem[key]
        if self.root and os.path.isfile(self._file(key)):
            try:
                emb = torch.load(self._file(key), map_location="cpu", weights_only=True)
            except Exception:  # unreadable entry: recompute and overwrite
                return None
            self._remember(key, emb)
            return emb
        return None

    def put(self, key: str, emb: torch.Tensor) -> None:
        emb = emb.detach().to("cpu")
        self._remember(key, emb)
        if self.root:
            f = self._file(key)
            os.makedirs(os.path.dirname(f), exist_ok=True)
            tmp = f"{f}.{os.getpid()}.tmp"
            torch.save(emb, tmp)
            os.replace(tmp, f)

    def _remember(self, key: str, emb: torch.Tensor) -> None:
        self.mem[key] = emb
        self.mem.move_to_end(key)
        while len(self.mem) > self.max_items:
            self.mem.popitem(last=False)


def frame_embeddings(model: ClipModel, cache: FrameEmbeddingCache, clips: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per clip (K, H, W, 3 uint8 frames), its (K, D) frame embeddings: from the cache, the missing
    ones computed in one image-tower pass and cached."""
    keys = [cache.key(c) for c in clips]
    frames = [cache.get(k) for k in keys]
    missing = [j for j, f in enumerate(frames) if f is None]
    if missing:
        for j, emb in zip(missing, model.encode_frames([clips[j] for j in missing])):
            cache.put(keys[j], emb)
            frames[j] = emb.to("cpu")
    return frames


def build_clip_model(clip_cfg, tiny_cache_dir: str, device="cpu") -> ClipModel:
    """The ``[rewards.clip]`` model: local open_clip weights, or the tiny random one."""
    if clip_cfg.tiny:
        from fastebm.tiny import ensure_tiny_clip

        model_name, weights = ensure_tiny_clip(tiny_cache_dir)
    else:
        model_name, weights = clip_cfg.model, clip_cfg.pretrained
    return ClipModel(model_name, weights, device)


def clip_scores(model: ClipModel, cache: FrameEmbeddingCache, texts: list[str], clips: list[torch.Tensor],
                clip_of: list[int], mode: str = "max", topk_ratio: float = 0.2) -> list[float]:
    """Score ``texts[i]`` against ``clips[clip_of[i]]``; empty texts score 0."""
    out = [0.0] * len(texts)
    valid = [i for i, t in enumerate(texts) if t]
    if not valid:
        return out
    needed = sorted({clip_of[i] for i in valid})
    frames = dict(zip(needed, frame_embeddings(model, cache, [clips[c] for c in needed])))
    dev = model.device
    if mode == "max":
        t = model.encode_text([texts[i] for i in valid])  # (n, D): the step's one text pass
        for j, i in enumerate(valid):
            out[i] = float((frames[clip_of[i]].to(dev) @ t[j]).max())
        return out
    if mode != "sentence_topk":
        raise ValueError(f"rewards.clip.mode must be 'max' or 'sentence_topk', got {mode!r}")
    sents = [clip_sentences(texts[i]) for i in valid]
    t = model.encode_text([s for ss in sents for s in ss])  # (sum of sentences, D): one text pass
    start = 0
    for ss, i in zip(sents, valid):
        f = frames[clip_of[i]].to(dev)  # (K, D)
        sim = f @ t[start:start + len(ss)].T  # (K, S)
        start += len(ss)
        k = max(1, int(f.shape[0] * topk_ratio))
        out[i] = float(sim.topk(k, dim=0).values.mean(dim=0).mean())
    return out


@register("clip")
def make_clip_reward(cfg, context):
    c = cfg.clip
    model = build_clip_model(c, context.tiny_cache_dir, context.device)
    cache = FrameEmbeddingCache(model.key, context.video_cache_dir)
    vision_tag = context.tags[0]

    def fn(completions, inputs):
        if len(inputs.videos) != len(inputs.records):
            raise ValueError(f"clip reward: {len(inputs.videos)} videos for {len(inputs.records)} prompts")
        texts = [extract_tag(t, vision_tag) or "" for t in completions]
        clip_of = [i // inputs.group_size for i in range(len(completions))]
        return clip_scores(model, cache, texts, [v.clip_frames for v in inputs.videos], clip_of, c.mode,
                           c.topk_ratio)

    fn.model, fn.cache = model, cache  # for tests and benchmarks (forward counting)
    return fn
