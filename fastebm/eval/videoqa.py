"""``fastebm eval videoqa``: zero-shot VideoQA on NExT-QA, ActivityNet-QA (yes/no) and PororoQA.

    fastebm eval videoqa RECIPE --bench nextqa|activitynet|pororoqa --annotations FILE --video-root DIR --out DIR
                         [--checkpoint DIR] [--answers FILE] [--video-map FILE] [--limit N]
                         [--prompt-mode ebm|cot|vanilla] [--frames N] [--max-new-tokens N]

Readers take each benchmark's public annotation files:

  nextqa       the csv with ``video, frame_count, width, height, question, answer, qid, type, a0 … a4``
               (``answer``: the correct option's index); clip ``{video_root}/{video}.mp4``. A question
               is ``{video}_{qid}`` (NExT-QA numbers questions per video). Types: CW, CH, TN, TC,
               TP, DL, DC, DO (the release reports CH, CW, DL, DO, TC, TN).
  activitynet  the question file (``test_q.json``: ``video_name, question_id, question``) and the
               answer file (``test_a.json``: ``question_id, answer, type``; ``--answers``, by default
               the question file's name with ``_q`` -> ``_a``; a question file whose items already
               hold ``answer`` needs none). Only the yes/no questions are kept (answer yes or no;
               type 3). Clip: ``video_name`` or ``v_`` + ``video_name``, with any of .mp4 .mkv .webm
               .avi .mov, in ``video_root``.
  pororoqa     the release's question file: ``{"PororoQA": [...]}`` (or a bare list) of ``qid,
               question, answer0 … answer4, correct_idx, video_name, supporting_num``. Clips: the
               scene's GIFs ``{video_root}/{episode}/{video_name}/{i}.gif`` (episode: ``video_name``
               without its last ``_`` part) for i from supporting_num - 8 to supporting_num + 7 (i >= 1,
               the existing ones), as the release.

``--video-map FILE``: a JSON object from a benchmark's video id to a file (or a list of files),
relative to ``--video-root``; it replaces the default location.

Frames, as the release: NExT-QA and ActivityNet-QA 32 frames evenly spaced over the clip (fewer
when the clip has fewer; ``--frames``), PororoQA 2 frames of each GIF (at a third and at two
thirds), all at the recipe's ``[video]`` pixel bounds. Decoding greedy, up to 1024 new tokens
(PororoQA 1536; ``--max-new-tokens``), the prompt of ``fastebm.eval.prompts.videoqa_prompt``.

Scoring: exact match of the ``<answer>…</answer>`` text (stripped) with the option index (NExT-QA,
PororoQA) or with yes/no, both lower-cased (ActivityNet-QA; without an answer block, the last
yes/no word of the output, as the release). No answer block: wrong. ``DIR/predictions.jsonl``
(``qid, pred, answer, correct, type``, the frames seen, the output and token counts; resumable like
``generate``)
and ``DIR/metrics.json`` (``accuracy``, ``correct``, ``n``, ``ci95`` (bootstrap), ``by_type``,
``no_answer``, ``skipped``), always recomputed from the whole predictions file.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastebm.config import Config
from fastebm.data import DataError
from fastebm.data.video import (VideoError, VideoMeta, build_sample, clip_resize_crop, decode, resize_frames,
                                smart_resize)
from fastebm.eval.extract import strict_answer
from fastebm.eval.generate import (GenItem, PrefetchSource, Sampling, read_jsonl, resolve_device, run_generation,
                                   video_geometry)
from fastebm.eval.prompts import videoqa_prompt
from fastebm.eval.stats import bootstrap_ci
from fastebm.model.loading import load_model

log = logging.getLogger("fastebm")

BENCHES = ("nextqa", "activitynet", "pororoqa")
FRAMES = {"nextqa": 32, "activitynet": 32, "pororoqa": 2}
"""Frames per clip: NExT-QA / ActivityNet-QA per video; PororoQA per GIF."""
MAX_NEW_TOKENS = {"nextqa": 1024, "activitynet": 1024, "pororoqa": 1536}
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


@dataclass
class QAItem:
    qid: str
    question: str
    options: Optional[list[str]]   # multiple choice; None for yes/no
    answer: str                    # the gold answer as compared: an option index, or yes / no
    type: Optional[str]
    video_id: str
    videos: tuple                  # the clip's file(s)


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def load_video_map(path: str) -> dict:
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: video map not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(m, dict) or not all(isinstance(v, (str, list)) for v in m.values()):
        raise DataError(f"{path}: expected an object {{video id: file or [files]}}")
    return m


def _mapped(video_map: dict, video_id: str, video_root: str) -> Optional[tuple]:
    v = video_map.get(video_id)
    if v is None:
        return None
    files = [v] if isinstance(v, str) else v
    return tuple(os.path.join(video_root, f) for f in files)


def read_nextqa(path: str, video_root: str, video_map: Optional[dict] = None) -> list[QAItem]:
    video_map = video_map or {}
    try:
        f = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: annotations file not found") from None
    with f:
        reader = csv.DictReader(f)
        need = ["video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"]
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (NExT-QA csv: video, frame_count, "
                            f"width, height, question, answer, qid, type, a0..a4)")
        items = []
        for line, row in enumerate(reader, 2):
            opts = [row[f"a{i}"] for i in range(5)]
            ans = row["answer"].strip()
            if not ans.isdigit() or not 0 <= int(ans) < 5:
                raise DataError(f"{path}: line {line}: field 'answer': expected an option index 0-4, got {ans!r}")
            video = row["video"].strip()
            items.append(QAItem(f"{video}_{row['qid'].strip()}", row["question"].strip(), opts, str(int(ans)),
                                row["type"].strip() or None, video,
                                _mapped(video_map, video, video_root) or (os.path.join(video_root, f"{video}.mp4"),)))
    return items


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None


def _anet_video(video_root: str, name: str) -> str:
    for stem in (name, f"v_{name}"):
        for ext in ("",) + VIDEO_EXTS:
            p = os.path.join(video_root, stem + ext)
            if os.path.isfile(p):
                return p
    hits = sorted(glob.glob(os.path.join(glob.escape(video_root), glob.escape(name) + ".*")))
    return hits[0] if hits else os.path.join(video_root, name + ".mp4")  # missing: the skip names this path


def read_activitynet(path: str, video_root: str, video_map: Optional[dict] = None,
                     answers_path: str = "") -> list[QAItem]:
    video_map = video_map or {}
    qs = _load_json(path, "question file")
    if not isinstance(qs, list):
        raise DataError(f"{path}: expected a JSON list of questions")
    merged = bool(qs) and isinstance(qs[0], dict) and "answer" in qs[0]
    answers = {}
    if not merged:
        if not answers_path:
            base = os.path.basename(path)
            guess = os.path.join(os.path.dirname(path), base.replace("_q", "_a", 1))
            if guess == path or not os.path.isfile(guess):
                raise DataError(f"{path}: no answers in the questions; give the answer file with --answers "
                                f"(looked for {guess})")
            answers_path = guess
        a_list = _load_json(answers_path, "answer file")
        if not isinstance(a_list, list):
            raise DataError(f"{answers_path}: expected a JSON list of answers")
        for i, a in enumerate(a_list):
            if not isinstance(a, dict) or "question_id" not in a or "answer" not in a:
                raise DataError(f"{answers_path}: item {i}: expected question_id and answer")
            answers[str(a["question_id"])] = a
    items = []
    for i, q in enumerate(qs):
        for k in ("video_name", "question_id", "question"):
            if not isinstance(q, dict) or k not in q:
                raise DataError(f"{path}: item {i}: missing field {k!r}")
        qid = str(q["question_id"])
        a = q if merged else answers.get(qid)
        if a is None:
            raise DataError(f"{answers_path}: no answer for question_id {qid!r} (item {i} of {path})")
        ans = str(a["answer"]).strip().lower()
        if ans not in ("yes", "no"):  # the yes/no subset (ActivityNet-QA type 3)
            continue
        name = str(q["video_name"])
        typ = a.get("type", q.get("type"))
        items.append(QAItem(qid, str(q["question"]).strip(), None, ans, None if typ is None else str(typ), name,
                            _mapped(video_map, name, video_root) or (_anet_video(video_root, name),)))
    return items


def _pororo_clips(video_root: str, video_name: str, supporting_num) -> tuple:
    episode = "_".join(video_name.split("_")[:-1])
    folder = os.path.join(video_root, episode, video_name)
    try:
        center = int(supporting_num)
    except (TypeError, ValueError):
        center = 1
    files = []
    for i in range(center - 8, center + 8):
        if i < 1:
            continue
        for ext in (".gif",) + VIDEO_EXTS:
            p = os.path.join(folder, f"{i}{ext}")
            if os.path.isfile(p):
                files.append(p)
                break
    return tuple(files)


def read_pororoqa(path: str, video_root: str, video_map: Optional[dict] = None) -> list[QAItem]:
    video_map = video_map or {}
    data = _load_json(path, "question file")
    if isinstance(data, dict):
        if "PororoQA" not in data:
            raise DataError(f"{path}: expected {{\"PororoQA\": [...]}} or a list of questions")
        data = data["PororoQA"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of questions")
    items = []
    for i, q in enumerate(data):
        for k in ("qid", "question", "correct_idx", "video_name"):
            if not isinstance(q, dict) or k not in q:
                raise DataError(f"{path}: item {i}: missing field {k!r}")
        opts = [q.get(f"answer{j}") for j in range(5)]
        opts = [o for o in opts if isinstance(o, str)]
        if not opts:
            raise DataError(f"{path}: item {i}: no options answer0..answer4")
        if not str(q["correct_idx"]).isdigit():
            raise DataError(f"{path}: item {i}: field 'correct_idx': expected an option index, "
                            f"got {q['correct_idx']!r}")
        name = str(q["video_name"])
        items.append(QAItem(str(q["qid"]), str(q["question"]).strip(), opts, str(int(q["correct_idx"])), None, name,
                            _mapped(video_map, name, video_root)
                            or _pororo_clips(video_root, name, q.get("supporting_num"))))
    return items


def read_bench(bench: str, annotations: str, video_root: str, video_map: str = "", answers: str = "") -> list[QAItem]:
    vmap = load_video_map(video_map)
    if bench == "nextqa":
        return read_nextqa(annotations, video_root, vmap)
    if bench == "activitynet":
        return read_activitynet(annotations, video_root, vmap, answers)
    if bench == "pororoqa":
        return read_pororoqa(annotations, video_root, vmap)
    raise ValueError(f"--bench {bench!r}: expected one of {', '.join(BENCHES)}")


# ----------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------


def fixed_frames_config(video_cfg, frames: int):
    """The recipe's ``[video]`` taking ``frames`` evenly spaced frames per clip (fewer when the clip
    has fewer): an fps so high that ``max_frames`` decides, and no minimum beyond Qwen's 2."""
    return dataclasses.replace(video_cfg, fps=1e9, min_frames=2, max_frames=frames)


class MultiClipSource:
    """PororoQA's clips: ``per_file`` frames of each of several files (at (k+1)/(per_file+1) of each,
    i.e. a third and two thirds for 2), joined in order into one clip at the recipe's pixel bounds."""

    def __init__(self, video_cfg, geometry: dict, per_file: int = 2):
        self.cfg, self.geometry, self.per_file = video_cfg, geometry, per_file

    def prefetch(self, videos) -> None:
        pass  # GIF scenes are small: decoded when asked

    def get(self, files: Sequence[str]):
        if not files:
            raise VideoError("(no files)", "no clip files found for this question")
        chunks = []
        for f in files:
            d = decode(f, timeout_s=self.cfg.timeout_s or None)        # every frame of one short clip
            n = d.frames.shape[0]
            idx = [min(n - 1, int(n * (k + 1) / (self.per_file + 1))) for k in range(self.per_file)]
            chunks.append((d.frames[idx], d.meta))
        H, W = chunks[0][0].shape[1:3]
        g = self.geometry
        try:
            h, w = smart_resize(H, W, factor=g["patch_size"] * g["merge_size"], min_pixels=self.cfg.min_pixels,
                                max_pixels=self.cfg.max_pixels)
        except ValueError as e:
            raise VideoError(files[0], f"absurd dimensions {W}x{H}: {e}") from None
        frames = torch.cat([resize_frames(c, h, w) for c, _ in chunks])   # (2 per file, h, w, 3)
        if frames.shape[0] % g["temporal_patch_size"]:
            frames = torch.cat([frames, frames[-1:]])
        T = frames.shape[0]
        meta = VideoMeta(path=files[0], backend=chunks[0][1].backend, codec=chunks[0][1].codec, width=W, height=H,
                         fps=2.0, duration=T / 2.0, num_frames=T, frame_indices=list(range(T)),
                         timestamps=[t / 2.0 for t in range(T)], sample_fps=2.0)  # the release passes fps 2
        return build_sample(frames, clip_resize_crop(frames, self.cfg.clip_size), meta, **g)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

_YES_NO = re.compile(r"\b(yes|no)\b")


def score(bench: str, output: str, gold: str, answer_tag: str = "answer") -> tuple[Optional[str], bool]:
    """``(pred, correct)`` of one output (see the module docstring)."""
    if bench == "activitynet":
        pred = strict_answer(output, answer_tag, ignore_case=True)
        if pred is not None:
            pred = pred.lower()
        else:
            words = _YES_NO.findall((output or "").lower())
            pred = words[-1] if words else None
        return pred, pred == gold.lower()
    pred = strict_answer(output, answer_tag)
    return pred, pred is not None and pred == gold


def videoqa_metrics(rows: Sequence[dict], seed: int = 0) -> dict:
    """Accuracy (with a bootstrap 95 % interval) and per-type accuracy of predictions rows."""
    correct = [1.0 if r["correct"] else 0.0 for r in rows]
    by_type: dict[str, list[float]] = {}
    for r, c in zip(rows, correct):
        if r.get("type") is not None:
            by_type.setdefault(str(r["type"]), []).append(c)
    n = len(rows)
    return {"accuracy": sum(correct) / n if n else None, "correct": int(sum(correct)), "n": n,
            "ci95": bootstrap_ci(correct, seed=seed),
            "by_type": {t: {"accuracy": sum(v) / len(v), "correct": int(sum(v)), "n": len(v)}
                        for t, v in sorted(by_type.items())},
            "no_answer": sum(1 for r in rows if r.get("pred") is None)}


def run_videoqa(cfg: Config, *, bench: str, annotations: str, video_root: str, out_dir: str, model_path: str,
                answers: str = "", video_map: str = "", limit: int = 0, mode: str = "ebm", frames: int = 0,
                max_new_tokens: int = 0, template_dir: str = "", progress: bool = True) -> dict:
    """``fastebm eval videoqa`` (see the module docstring); returns what ``metrics.json`` holds."""
    items = read_bench(bench, annotations, video_root, video_map, answers)
    seen = set()
    for it in items:
        if it.qid in seen:
            raise DataError(f"{annotations}: question id {it.qid!r} appears twice")
        seen.add(it.qid)
    if limit > 0:
        items = items[:limit]
    lm = load_model(model_path, resolve_device(cfg.run.device), cfg.model.dtype, cfg.model.attn_implementation,
                    trainable=False)
    geometry = video_geometry(lm.model)
    if bench == "pororoqa":
        source = MultiClipSource(cfg.video, geometry, frames or FRAMES[bench])
        gen = [GenItem(it.qid, it.videos, it) for it in items]
    else:
        source = PrefetchSource(fixed_frames_config(cfg.video, frames or FRAMES[bench]), geometry)
        gen = [GenItem(it.qid, it.videos[0], it) for it in items]
    tags = cfg.data.tags
    sampling = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[bench],
                        seed=cfg.run.seed)

    def build_prompt(g: GenItem, video) -> list[int]:
        it: QAItem = g.data
        return videoqa_prompt(it.question, it.options, mode, tokenizer=lm.tokenizer,
                              num_video_tokens=video.num_video_tokens, tags=tags, template_dir=template_dir)

    def make_row(g: GenItem, video, *, text: str, **numbers) -> dict:
        it: QAItem = g.data
        pred, ok = score(bench, text, it.answer, tags[2])
        return {"qid": it.qid, "pred": pred, "answer": it.answer, "correct": ok, "type": it.type, "bench": bench,
                "question": it.question, "video": list(it.videos), "frames": int(video.meta.num_frames
                if bench == "pororoqa" else len(video.meta.frame_indices)), "raw_output": text, "prompt_mode": mode,
                **numbers}

    os.makedirs(out_dir, exist_ok=True)
    preds = os.path.join(out_dir, "predictions.jsonl")
    try:
        stats = run_generation(gen, model=lm, source=source, build_prompt=build_prompt, make_row=make_row,
                               sampling=sampling, shared_prefix=cfg.rollout.shared_prefix,
                               batch_size=cfg.eval.batch_size, out_path=preds, id_key="qid",
                               skipped_path=os.path.join(out_dir, "skipped.jsonl"), desc=f"videoqa {bench}",
                               progress=progress)
    finally:
        source.close()
    wanted = {it.qid for it in items}
    rows = [r for r in read_jsonl(preds) if r["qid"] in wanted]
    result = {"bench": bench, "annotations": os.path.abspath(annotations), "model": model_path, "prompt_mode": mode,
              **videoqa_metrics(rows, cfg.run.seed), "questions": len(items), "skipped": stats.skipped}
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    return result
