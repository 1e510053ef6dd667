"""``fastebm generate``: batched generation over a records file, one JSON line per record.

    fastebm generate RECIPE --records FILE --out preds.jsonl [--checkpoint DIR] [--prompt-mode ebm|cot|vanilla]
                     [--limit N] [section.key=value ...]

The recipe gives the model (``--checkpoint`` replaces it), the video sampling (``[video]``), the tags,
the profiles (``data.profiles``) and the evaluation sampling (``[eval]``: temperature 0.7, top_p 0.9,
2048 new tokens, the release's; ``eval.temperature=0`` is greedy). Prompts come from
``fastebm.eval.prompts.eval_prompt``.

The loop (``run_generation``, shared with ``fastebm eval videoqa``): records in batches of
``eval.batch_size``; the batch's clips are decoded by the video prefetcher (the next batch's while
this one generates); one rollout per batch on the shared prefix (``fastebm.model.decode``,
``rollout.shared_prefix = false``: HF generate), one sample per prompt, seeded per record id (the
output of a record does not depend on its batch, on ``--limit`` or on a resume). A bad video is
skipped and written to ``<out>.skipped.jsonl``; a malformed record too. Lines are appended and
flushed per batch: a rerun skips the ids already in the output (a line cut by an interruption is
dropped and redone), so an interrupted run resumes where it stopped.

Each line: ``id``, ``data_source``, ``video`` (the resolved file), ``answer`` (lenient, or null),
``answer_tagged``, ``vision``, ``think``, ``format_reward``, ``format_strict``, ``raw_output``,
``prompt_mode``, ``prompt_tokens``, ``completion_tokens``, ``truncated``, ``time_s`` (the batch's
generation seconds divided by its size), ``model``, ``sampling``, ``profiles`` (the two profile
texts the prompt used) and ``record`` (the record itself, so judges and metrics need no other file).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch

from fastebm.config import Config, RolloutConfig
from fastebm.data import DataError
from fastebm.data.records import Profiles, Record, load_usable_records, resolve_video
from fastebm.data.video import VideoError, VideoPrefetcher, VideoSample
from fastebm.eval.extract import parse_output
from fastebm.eval.progress import Progress
from fastebm.eval.prompts import PROMPT_MODES, eval_prompt, prompt_templates
from fastebm.model.decode import shared_prefix_rollout
from fastebm.model.forward import Prompt
from fastebm.model.loading import LoadedModel, load_model
from fastebm.model.rollout import rollout
from fastebm.utils import hash_seed

log = logging.getLogger("fastebm")


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    """How completions are sampled: the ``[eval]`` section (``from_config``; the defaults live there), or
    VideoQA's greedy decoding."""
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int

    @classmethod
    def from_config(cls, cfg: Config) -> "Sampling":
        e = cfg.eval
        return cls(e.temperature, e.top_p, e.top_k, e.max_new_tokens, cfg.run.seed)

    def rollout_config(self, shared_prefix: bool) -> RolloutConfig:
        return RolloutConfig(group_size=1, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                             max_new_tokens=self.max_new_tokens, shared_prefix=shared_prefix)


@dataclass
class GenItem:
    """One thing to generate for: its output id, its video (a path, or a tuple of paths for a
    multi-clip source) and its data (a Record, a VideoQA item ...)."""
    id: str
    video: Union[str, tuple]
    data: Any


@dataclass
class GenerationStats:
    total: int          # items asked for
    already_done: int   # found in the output before this run
    generated: int
    skipped: int        # bad videos (in the skipped file)


def resolve_device(name: str) -> torch.device:
    """``run.device``: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but CUDA is not available on this machine")
    return torch.device(name)


def video_geometry(model) -> dict:
    """The vision tower's patch sizes, which the video sampler needs."""
    v = model.config.vision_config
    return dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)


def item_seed(seed: int, item_id: str) -> int:
    """The sampling seed of one item: a function of the run seed and the item's id only."""
    h = int.from_bytes(hashlib.blake2b(str(item_id).encode(), digest_size=8).digest(), "little") >> 2
    return hash_seed(seed, h)


def append_jsonl(path: str, rows: Sequence[dict]) -> None:
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        f.flush()


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file; a bad line is a DataError naming the file and the line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n}: expected a JSON object")
            out.append(row)
    return out


def done_ids(path: str, key: str = "id") -> set[str]:
    """Ids already in an output JSONL (for resuming). A last line cut by an interruption (no final
    newline, not valid JSON) is removed from the file, so the rerun appends after whole lines."""
    if not os.path.isfile(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            data += b"\n"  # a whole line that only lacks its newline
        except ValueError:
            log.warning("%s: dropping an unfinished last line (an interrupted run); it is generated again", path)
            data = data[:cut]
        with open(path, "wb") as f:
            f.write(data)
    ids = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                ids.add(str(json.loads(line)[key]))
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}: line {n}: not an output line with {key!r} "
                                "(is this the right file?)") from None
    return ids


class PrefetchSource:
    """Clips of single files through the video prefetcher (decode ahead, per-file time limit)."""

    def __init__(self, video_cfg, geometry: dict):
        self.pf = VideoPrefetcher(video_cfg, worker_type="thread", **geometry)

    def prefetch(self, videos: Sequence[str]) -> None:
        self.pf.prefetch(list(videos))

    def get(self, video: str) -> VideoSample:
        return self.pf.get(video)

    def close(self) -> None:
        self.pf.close()


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def run_generation(items: Sequence[GenItem], *, model: LoadedModel, source,
                   build_prompt: Callable[[GenItem, VideoSample], list[int]], make_row: Callable[..., dict],
                   sampling: Sampling, shared_prefix: bool, batch_size: int, out_path: str, skipped_path: str,
                   desc: str = "generate", progress: bool = True, id_key: str = "id") -> GenerationStats:
    """Generate for every item whose id (the rows' ``id_key`` field) is not in ``out_path`` yet;
    append one row per item.

    ``source``: ``prefetch(videos)`` / ``get(video) -> VideoSample`` (raises VideoError).
    ``make_row(item, video, text=, prompt_tokens=, completion_tokens=, truncated=, time_s=)`` -> the row.
    """
    os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
    done = done_ids(out_path, id_key)
    todo = [it for it in items if it.id not in done]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    sample = shared_prefix_rollout if shared_prefix else rollout
    rcfg = sampling.rollout_config(shared_prefix)
    bar = Progress(len(todo), desc, progress)
    stats = GenerationStats(len(items), len(items) - len(todo), 0, 0)
    if done:
        log.info("%s: %d of %d already done, %d to go", out_path, stats.already_done, len(items), len(todo))
    try:
        if batches:
            source.prefetch([it.video for it in batches[0]])
        for b, batch in enumerate(batches):
            loaded, skips = [], []
            for it in batch:
                try:
                    loaded.append((it, source.get(it.video)))
                except VideoError as e:
                    skips.append({"id": it.id, "file": e.path, "reason": e.reason})
                    log.warning("skipped %s: %s", it.id, e)
            if b + 1 < len(batches):  # the next batch's clips decode while this one generates
                source.prefetch([it.video for it in batches[b + 1]])
            prompts, kept = [], []
            for it, v in loaded:
                try:
                    prompts.append(Prompt(build_prompt(it, v), v))
                    kept.append((it, v))
                except DataError as e:  # e.g. over data.max_prompt_tokens even without dialogue history
                    skips.append({"id": it.id, "file": it.video, "reason": str(e)})
                    log.warning("skipped %s: %s", it.id, e)
            loaded = kept
            append_jsonl(skipped_path, skips)
            stats.skipped += len(skips)
            rows = []
            if loaded:
                t0 = time.perf_counter()
                res = sample(model.model, model.tokenizer, prompts, rcfg,
                             seeds=[item_seed(sampling.seed, it.id) for it, _ in loaded])
                per = (time.perf_counter() - t0) / len(loaded)
                for k, (it, v) in enumerate(loaded):
                    rows.append(make_row(it, v, text=res.texts[k], prompt_tokens=len(prompts[k].ids),
                                         completion_tokens=len(res.completion_ids[k]), truncated=res.truncated[k],
                                         time_s=round(per, 4)))
            append_jsonl(out_path, rows)
            stats.generated += len(rows)
            bar.advance(len(batch), f"skipped {stats.skipped}" if stats.skipped else "")
    finally:
        bar.close()
    return stats


# ----------------------------------------------------------------------------------------------
# fastebm generate
# ----------------------------------------------------------------------------------------------


def record_to_dict(rec: Record) -> dict:
    """A record back in the released format (what a predictions line carries)."""
    out = {"problem_id": rec.problem_id, "session_id": rec.session_id, "data_source": rec.data_source,
           "user": rec.user, "assistant": rec.assistant,
           "dialogue": [{"speaker": t.speaker, "utterance": t.utterance} for t in rec.dialogue],
           "target": {"speaker": rec.target.speaker, "utterance": rec.target.utterance},
           "video_path": rec.video_path, "solution": rec.solution, "problem_type": rec.problem_type,
           "generation_type": rec.generation_type}
    if rec.process is not None:
        out["process"] = rec.process
    return {**out, **rec.extra}


def skipped_path_for(out_path: str) -> str:
    """``preds.jsonl`` -> ``preds.skipped.jsonl``."""
    base, ext = os.path.splitext(out_path)
    return f"{base}.skipped{ext or '.jsonl'}"


def generate_predictions(cfg: Config, *, model_path: str, records_path: str, out_path: str, mode: str = "ebm",
                         limit: int = 0, progress: bool = True) -> GenerationStats:
    """``fastebm generate``: see the module docstring. ``model_path``: a ``from_pretrained`` directory."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"--prompt-mode {mode!r}: expected one of {', '.join(PROMPT_MODES)}")
    skipped = skipped_path_for(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
    d = cfg.data
    records = load_usable_records(records_path, lambda **e: append_jsonl(skipped, [e]),  # a video outside the
                                  require=lambda r: resolve_video(r, d.video_root, d.allow_outside_root))  # root
    seen: dict[str, int] = {}
    for r in records:
        if str(r.problem_id) in seen:
            raise DataError(f"{records_path}: record {r.index}: problem_id {r.problem_id!r} repeats record "
                            f"{seen[str(r.problem_id)]}: ids must be unique (they key the output and its resume)")
        seen[str(r.problem_id)] = r.index
    if limit > 0:
        records = records[:limit]
    profiles = Profiles.load(cfg.data.profiles)
    lm = load_model(model_path, resolve_device(cfg.run.device), cfg.model.dtype, cfg.model.attn_implementation,
                    trainable=False)
    sampling = Sampling.from_config(cfg)
    items = [GenItem(str(r.problem_id), resolve_video(r, d.video_root, d.allow_outside_root), r) for r in records]

    templates = prompt_templates(cfg.prompt, mode)  # the recipe's [prompt] templates of the mode, checked once

    def build_prompt(it: GenItem, video: VideoSample) -> list[int]:
        return eval_prompt(it.data, templates, tokenizer=lm.tokenizer, num_video_tokens=video.num_video_tokens,
                           profiles=profiles, tags=d.tags, max_history_turns=d.max_history_turns,
                           max_prompt_tokens=d.max_prompt_tokens)

    def make_row(it: GenItem, video: VideoSample, *, text: str, **numbers) -> dict:
        rec: Record = it.data
        return {"id": it.id, "data_source": rec.data_source, "video": it.video, **parse_output(text, d.tags),
                "raw_output": text, "prompt_mode": mode, **numbers, "model": model_path,
                "sampling": dataclasses.asdict(sampling),
                "profiles": {"user": profiles.get(rec.data_source, rec.user),
                             "assistant": profiles.get(rec.data_source, rec.assistant)},
                "record": record_to_dict(rec)}

    source = PrefetchSource(cfg.video, video_geometry(lm.model))
    try:
        return run_generation(items, model=lm, source=source, build_prompt=build_prompt, make_row=make_row,
                              sampling=sampling, shared_prefix=cfg.rollout.shared_prefix,
                              batch_size=cfg.eval.batch_size, out_path=out_path, skipped_path=skipped,
                              desc=f"generate ({mode})", progress=progress)
    finally:
        source.close()


def load_predictions(path: str, need: Sequence[str] = ("id", "raw_output", "record")) -> list[dict]:
    """The rows of a predictions file, each checked for the fields ``need`` (a DataError names the
    file, the line's id and the field)."""
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        for k in need:
            if k not in row:
                raise DataError(f"{path}: line {i + 1} (id {row.get('id', '?')}): missing field {k!r} "
                                f"(write predictions with fastebm generate)")
        if "raw_output" in need and not isinstance(row["raw_output"], (str, type(None))):
            raise DataError(f"{path}: line {i + 1} (id {row.get('id')}): field 'raw_output': expected a string")
    return rows


