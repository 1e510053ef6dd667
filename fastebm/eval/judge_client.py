"""The judge client: an OpenAI-compatible server or a local vision-language model, one contract.

A judge answers chat messages (OpenAI chat-completions format: a system turn, then user turns whose
content is a list of ``image_url`` parts (``data:`` URLs) and ``text`` parts) with a text reply.

  OpenAIJudge   ``--judge-url URL --judge-model NAME``: the ``openai`` package against any server
                that speaks chat completions (OpenAI, vLLM, SGLang ...). The key comes from the
                environment variable FASTEBM_JUDGE_API_KEY and is never logged or written; without
                it a placeholder is sent (local servers accept any). Temperature 0. HTTP 429 and
                5xx (and connection errors and timeouts) are retried with exponential backoff and
                jitter (``Retry-After`` honoured), up to ``max_retries`` times; any other HTTP
                error stops the command (a wrong key or model name would fail every request).
  LocalJudge    ``--judge-local PATH``: a Qwen2-VL / Qwen2.5-VL ``from_pretrained`` directory run
                in-process: the image parts become one video input of the model, the turns its
                chat; greedy decoding.

``ask`` runs one question through a judge under a reply contract: ``parse(reply)`` returns the
valid entries and the problems; entries are merged over attempts; while required entries are
missing the judge is asked again (the conversation continues with its reply and a re-ask naming
the problem, template ``judge_reask.txt``) up to ``max_reasks`` times; then the missing entries
are failures, counted. Every reply is cached on disk under the hash of the request (judge
identity, parameters, messages; never the key), so an interrupted or repeated evaluation asks
nothing twice: a re-ask is a different request (it holds the previous reply), so it is cached too.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from fastebm.eval.templates import render_template

log = logging.getLogger("fastebm")

API_KEY_ENV = "FASTEBM_JUDGE_API_KEY"


class JudgeError(RuntimeError):
    """The judge cannot be used (a non-retryable HTTP error, a bad local model): the command stops."""


class JudgeUnavailable(JudgeError):
    """HTTP 429 / 5xx / connection errors past every retry: this question fails, the run goes on."""


@dataclass
class JudgeStats:
    """What a judge run cost and how it went; thread-safe counters."""
    requests: int = 0        # requests answered by the judge (not the cache)
    cache_hits: int = 0      # requests answered from the on-disk cache
    http_retries: int = 0    # 429 / 5xx / connection errors retried
    http_failures: int = 0   # questions given up after max_retries HTTP retries
    invalid_replies: int = 0  # replies that broke the contract or missed entries
    reasks: int = 0          # follow-up requests after an invalid reply
    failures: int = 0        # entries still missing after every re-ask (or after an HTTP failure)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("requests", "cache_hits", "http_retries", "http_failures",
                                              "invalid_replies", "reasks", "failures")}


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------


class JudgeCache:
    """Replies on disk, one JSON file per request hash (``dir/ab/abcdef….json``); writes are atomic."""

    def __init__(self, directory: str):
        self.dir = os.path.expanduser(directory)
        os.makedirs(self.dir, exist_ok=True)

    @staticmethod
    def key(identity: dict, messages: Sequence[dict]) -> str:
        blob = json.dumps({"judge": identity, "messages": list(messages)}, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key[:2], key + ".json")

    def get(self, key: str) -> Optional[str]:
        try:
            with open(self._path(key), encoding="utf-8") as f:
                return json.load(f)["reply"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, reply: str) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"reply": reply}, f, ensure_ascii=False)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Judges
# ----------------------------------------------------------------------------------------------


class OpenAIJudge:
    """Chat completions through the ``openai`` package (see the module docstring)."""

    def __init__(self, base_url: str, model: str, *, temperature: float = 0.0, max_tokens: int = 4096,
                 timeout_s: float = 120.0, max_retries: int = 6, backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        try:
            import openai
        except ImportError as e:  # pragma: no cover - the eval extra installs it
            raise JudgeError("the judge needs the openai package: pip install 'fastebm[eval]'") from e
        self._openai = openai
        key = os.environ.get(API_KEY_ENV) or "no-key"
        # max_retries=0: the retry loop is ours (counted, Retry-After honoured, never cached).
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout_s)
        self.base_url, self.model = base_url, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.identity = {"kind": "openai", "model": model, "temperature": temperature, "max_tokens": max_tokens}

    def _retryable(self, e: Exception) -> bool:
        o = self._openai
        if isinstance(e, (o.APIConnectionError, o.APITimeoutError, o.RateLimitError, o.InternalServerError)):
            return True
        return isinstance(e, o.APIStatusError) and (e.status_code == 429 or e.status_code >= 500)

    def _delay(self, attempt: int, e: Exception) -> float:
        response = getattr(e, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        try:
            if retry_after is not None:
                return min(self.max_backoff_s, max(0.0, float(retry_after)))
        except ValueError:
            pass
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    def complete(self, messages: Sequence[dict], stats: JudgeStats) -> str:
        kwargs = dict(model=self.model, messages=list(messages), temperature=self.temperature)
        if self.max_tokens:
            kwargs["max_completion_tokens"] = self.max_tokens
        for attempt in range(self.max_retries + 1):
            try:
                r = self.client.chat.completions.create(**kwargs)
                return (r.choices[0].message.content or "") if r.choices else ""
            except self._openai.APIError as e:
                if not self._retryable(e):
                    status = getattr(e, "status_code", None)
                    raise JudgeError(f"judge at {self.base_url}: HTTP {status}: {type(e).__name__}: "
                                     f"{str(e)[:300]}") from None
                if attempt == self.max_retries:
                    raise JudgeUnavailable(f"judge at {self.base_url}: still failing after {self.max_retries} retries: "
                                     f"{type(e).__name__}") from None
                stats.add(http_retries=1)
                delay = self._delay(attempt, e)
                log.debug("judge: %s, retrying in %.2fs", type(e).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


def _decode_images(parts: Sequence[dict]):
    """uint8 [T, H, W, 3] frames from ``image_url`` data-URL parts (all resized to the first's size)."""
    import numpy as np
    import torch
    from PIL import Image

    frames = []
    for p in parts:
        url = p["image_url"]["url"]
        if not url.startswith("data:"):
            raise JudgeError("the local judge reads data: URLs only")
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        if frames and img.size != frames[0].size:
            img = img.resize(frames[0].size)
        frames.append(img)
    return torch.from_numpy(np.stack([np.asarray(f) for f in frames]))


class LocalJudge:
    """A local Qwen2-VL / Qwen2.5-VL run in-process with the same messages and contract.

    The first user turn's image parts become the model's video input (frames resized within
    ``video_cfg``'s pixel bounds; an odd count repeats the last frame, Qwen's temporal patch is 2);
    the turns are rendered by the model's chat template; greedy decoding of up to ``max_new_tokens``.
    One request at a time (a lock): concurrency does not apply in-process.
    """

    def __init__(self, path: str, *, device: str = "auto", max_new_tokens: int = 512, video_cfg=None):
        from fastebm.config import VideoConfig
        from fastebm.eval.generate import resolve_device, video_geometry
        from fastebm.model.loading import load_model

        self.lm = load_model(os.path.expanduser(path), resolve_device(device), trainable=False)
        self.geometry = video_geometry(self.lm.model)
        self.video_cfg = video_cfg or VideoConfig()
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.identity = {"kind": "local", "path": os.path.realpath(self.lm.path), "max_new_tokens": max_new_tokens}

    def _video(self, parts: Sequence[dict]):
        from fastebm.data.video import VideoMeta, build_sample, resize_frames, smart_resize

        import torch

        frames = _decode_images(parts)                                     # (T, H, W, 3) uint8
        if frames.shape[0] % 2:  # Qwen's temporal patch is 2 frames
            frames = torch.cat([frames, frames[-1:]])
        T, H, W = frames.shape[:3]
        g, c = self.geometry, self.video_cfg
        h, w = smart_resize(H, W, factor=g["patch_size"] * g["merge_size"], min_pixels=c.min_pixels,
                            max_pixels=c.max_pixels)
        policy = resize_frames(frames, h, w)
        meta = VideoMeta(path="judge-frames", backend="pil", codec="jpeg", width=W, height=H, fps=1.0,
                         duration=float(T), num_frames=T, frame_indices=list(range(T)),
                         timestamps=[float(t) for t in range(T)], sample_fps=1.0)
        return build_sample(policy, policy[:1], meta, **g)

    def complete(self, messages: Sequence[dict], stats: JudgeStats) -> str:
        from fastebm.config import RolloutConfig
        from fastebm.data.prompts import encode_prompt
        from fastebm.model.decode import shared_prefix_rollout
        from fastebm.model.forward import Prompt

        chat, images = [], None
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                chat.append({"role": m["role"], "content": content})
                continue
            text = "\n".join(p["text"] for p in content if p.get("type") == "text")
            imgs = [p for p in content if p.get("type") == "image_url"]
            if imgs and images is None:
                images = imgs
                chat.append({"role": m["role"], "content": [{"type": "video"}, {"type": "text", "text": text}]})
            else:
                chat.append({"role": m["role"], "content": text})
        if images is None:
            raise JudgeError("the local judge needs the clip's frames (image parts) in the first user turn")
        with self.lock:
            video = self._video(images)
            ids = encode_prompt(self.lm.tokenizer, chat, video.num_video_tokens)
            cfg = RolloutConfig(group_size=1, temperature=0.0, max_new_tokens=self.max_new_tokens)
            res = shared_prefix_rollout(self.lm.model, self.lm.tokenizer, [Prompt(ids, video)], cfg, seeds=[0])
            return res.texts[0]


# ----------------------------------------------------------------------------------------------
# Asking under a contract
# ----------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """The outcome of one question: the merged valid entries, the entries still missing (failures),
    the replies received, and whether the judge could be reached at all."""
    values: dict
    missing: list
    replies: list[str]
    http_failed: bool = False


class Asker:
    """A judge, its cache and the run's counters: ``ask(messages, parse, required)``."""

    def __init__(self, judge, cache: Optional[JudgeCache], *, max_reasks: int = 2, template_dir: str = ""):
        self.judge, self.cache, self.max_reasks = judge, cache, max_reasks
        self.template_dir = template_dir
        self.stats = JudgeStats()

    def reply(self, messages: Sequence[dict]) -> str:
        """One request: from the cache, else the judge (then cached)."""
        key = JudgeCache.key(self.judge.identity, messages) if self.cache else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.add(cache_hits=1)
                return hit
        text = self.judge.complete(messages, self.stats)
        self.stats.add(requests=1)
        if key is not None:
            self.cache.put(key, text)
        return text

    def ask(self, messages: Sequence[dict], parse: Callable[[str], tuple[dict, list[str]]],
            required: Sequence[str]) -> Answer:
        """Ask until every ``required`` entry is valid or the re-asks run out (see the module docstring).
        ``parse(reply) -> (valid entries, problems)``. A judge that stays unreachable (HTTP retries
        exhausted) fails every required entry; a non-retryable HTTP error raises JudgeError."""
        convo, merged, replies = list(messages), {}, []
        for attempt in range(self.max_reasks + 1):
            try:
                text = self.reply(convo)
            except JudgeUnavailable as e:
                log.warning("%s", e)
                missing = [k for k in required if k not in merged]
                self.stats.add(http_failures=1, failures=len(missing))
                return Answer(merged, missing, replies, http_failed=True)
            replies.append(text)
            values, problems = parse(text)
            merged.update({k: v for k, v in values.items() if k in required})
            missing = [k for k in required if k not in merged]
            if not missing:
                return Answer(merged, [], replies)
            self.stats.add(invalid_replies=1)
            if attempt < self.max_reasks:
                self.stats.add(reasks=1)
                problem = "; ".join(problems) if problems else ""
                problem = (problem + "; " if problem else "") + "missing or invalid: " + ", ".join(map(str, missing))
                convo = convo + [{"role": "assistant", "content": text},
                                 {"role": "user", "content": render_template("judge_reask.txt", {"problem": problem},
                                                                             self.template_dir)}]
        self.stats.add(failures=len(missing))
        return Answer(merged, missing, replies)


def json_object(reply: str) -> tuple[Optional[dict], Optional[str]]:
    """The JSON object in a reply (a ```json fence, or text around the outermost braces, is
    tolerated): ``(object, None)`` or ``(None, what is wrong)``."""
    text = (reply or "").strip()
    if not text:
        return None, "the reply is empty"
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None, "the reply holds no JSON object"
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        return None, f"the JSON does not parse ({e.msg} at character {e.pos})"
    if not isinstance(obj, dict):
        return None, "the reply's JSON is not an object"
    return obj, None
