"""``fastebm eval auto``: reward-based metrics of a predictions file, overall and per ``data_source``.

    fastebm eval auto PREDS --recipe RECIPE --out DIR [--teacher DIR] [section.key=value ...]

Per prediction (the recipe's tags):

  format_strict      1 when the dense format reward is at its maximum 5 (every tag once, in order,
                     nothing before <vision> or after </answer>), else 0: the mean is the rate
  format             the dense format reward in [-5, 5] (``fastebm.rewards.format``)
  <reward>           every reward the recipe enables (``[rewards].enabled``, format aside), built by
                     ``build_rewards`` from the recipe's ``[rewards]`` section and called on batches
                     of ``eval.batch_size`` predictions exactly as in training (group size 1):
                     accuracy (BERTScore, or ROUGE-L without an encoder), clip (the <vision> text
                     against the clip's frames), pcg (under the teacher: ``--teacher`` or the
                     recipe's reference model; the reward scores its own teacher requests) and
                     plug-ins. accuracy reads the lenient answer (the one the judge reads: a reply
                     cut before </answer>, or an untagged one, is still an answer); the others read
                     the raw output.
  answer_words       words in the lenient answer (0 when empty); completion_tokens as generated

Over a group: the means, ``distinct_1`` / ``distinct_2`` (distinct word n-grams / all n-grams of
the group's answers), ``empty_answer_rate`` and ``n``. Rewards that need the clip (clip, pcg and
plug-ins) decode it with the recipe's ``[video]``; a prediction whose video fails is left out of
every metric and listed under ``skipped``. PCG's teacher prompt is the training prompt
(``eval_prompt`` in ``ebm`` mode) with the profiles the prediction was generated with.

Writes ``DIR/metrics.json`` (``overall``, ``by_data_source``, ``rewards``, ``skipped``) and
``DIR/metrics.md`` (the same as a markdown table).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from fastebm.config import Config
from fastebm.data.records import Profiles, parse_record
from fastebm.data.video import VideoError
from fastebm.eval.extract import lenient_answer
from fastebm.eval.generate import PrefetchSource, load_predictions, resolve_device, video_geometry
from fastebm.eval.progress import Progress
from fastebm.eval.prompts import eval_prompt, prompt_templates
from fastebm.eval.stats import distinct_n, mean
from fastebm.model.loading import LoadedModel, load_model
from fastebm.rewards import RewardContext, RewardInputs, build_rewards, call_reward, needs_teacher
from fastebm.rewards.format import format_reward

log = logging.getLogger("fastebm")

TEXT_ONLY_REWARDS = ("format", "accuracy")
"""Rewards that read only the text and the record: no clip is decoded for them."""


def _profiles_of(rows: Sequence[dict], records) -> Profiles:
    """The profile texts the predictions were generated with, as a Profiles table."""
    table: dict = {}
    for row, rec in zip(rows, records):
        p = row.get("profiles") or {}
        src = table.setdefault(rec.data_source, {})
        for role, name in (("user", rec.user), ("assistant", rec.assistant)):
            if isinstance(p.get(role), str):
                src.setdefault(name, p[role])
    return Profiles(table)


def summarize(values: dict[str, list[Optional[float]]], answers: list[str]) -> dict:
    """One group's metrics from per-prediction values (None entries are left out of a mean)."""
    out: dict = {"n": len(answers)}
    for k, vs in values.items():
        xs = [v for v in vs if v is not None]
        out[k] = mean(xs)
    out["empty_answer_rate"] = mean([0.0 if a else 1.0 for a in answers])
    out["distinct_1"] = distinct_n(answers, 1)
    out["distinct_2"] = distinct_n(answers, 2)
    return out


def auto_metrics(cfg: Config, preds_path: str, out_dir: str, *, teacher_path: str = "",
                 progress: bool = True) -> dict:
    """``fastebm eval auto`` (see the module docstring); returns what ``metrics.json`` holds."""
    rows = load_predictions(preds_path, need=("id", "raw_output", "record", "video"))
    if not rows:
        raise ValueError(f"{preds_path}: no predictions")
    records = [parse_record(row["record"], preds_path, i) for i, row in enumerate(rows)]
    tags = tuple(cfg.data.tags)
    names = [n for n in cfg.rewards.enabled if n != "format"]
    device = resolve_device(cfg.run.device)
    teacher = _load_teacher(cfg, names, teacher_path, device)
    rewards = build_rewards(names, cfg.rewards, RewardContext(
        tags=tags, device=device, reference=teacher, tiny_cache_dir=cfg.model.tiny_cache_dir,
        video_cache_dir=cfg.video.cache_dir, kernel=cfg.grpo.kernel, shared_prefix=cfg.rollout.shared_prefix))
    need_video = any(n not in TEXT_ONLY_REWARDS for n in names)
    profiles = _profiles_of(rows, records)
    templates = prompt_templates(cfg.prompt, "ebm")  # the PCG teacher sees the training prompt
    source = PrefetchSource(cfg.video, video_geometry(teacher.model) if teacher else {}) if need_video else None

    def teacher_prompt(i: int, video) -> list[int]:
        return eval_prompt(records[i], templates, tokenizer=teacher.tokenizer, num_video_tokens=video.num_video_tokens,
                           profiles=profiles, tags=tags, max_history_turns=cfg.data.max_history_turns,
                           max_prompt_tokens=cfg.data.max_prompt_tokens)

    per: dict[str, list[Optional[float]]] = {k: [None] * len(rows) for k in
                                             ["format_strict", "format", *names, "answer_words", "completion_tokens"]}
    answers: list[str] = [""] * len(rows)
    keep = [True] * len(rows)
    skipped, errors = [], {n: 0 for n in names}
    B = cfg.eval.batch_size
    bar = Progress(len(rows), "eval auto", progress)
    try:
        for start in range(0, len(rows), B):
            idx = list(range(start, min(start + B, len(rows))))
            videos = {}
            if source is not None:  # this batch's clips; the next batch's start decoding
                if start + B < len(rows):
                    source.prefetch([rows[i]["video"] for i in range(start + B, min(start + 2 * B, len(rows)))])
                for i in idx:
                    try:
                        videos[i] = source.get(rows[i]["video"])
                    except VideoError as e:
                        keep[i] = False
                        skipped.append({"id": rows[i]["id"], "file": e.path, "reason": e.reason})
            idx = [i for i in idx if keep[i]]
            for i in idx:
                answers[i], numbers = _text_metrics(rows[i], tags)
                for k, v in numbers.items():
                    per[k][i] = v
            if idx and names:
                inputs = RewardInputs(records=[records[i] for i in idx], group_size=1,
                                      videos=[videos[i] for i in idx] if source is not None else [])
                if teacher is not None:
                    inputs.prompt_ids = [teacher_prompt(i, videos[i]) for i in idx]
                raw = [rows[i]["raw_output"] or "" for i in idx]
                for name, fn in rewards.items():
                    # accuracy reads the lenient answer (see the module docstring), every other reward the output
                    texts = [f"<{tags[2]}>{answers[i]}</{tags[2]}>" for i in idx] if name == "accuracy" else raw
                    vals, n_err = call_reward(name, fn, texts, inputs, cfg.rewards.on_error)
                    errors[name] += n_err
                    for i, v in zip(idx, vals):
                        per[name][i] = v
            bar.advance(min(B, len(rows) - start))
    finally:
        bar.close()
        if source is not None:
            source.close()

    def group(ids: list[int]) -> dict:
        return summarize({k: [v[i] for i in ids] for k, v in per.items()}, [answers[i] for i in ids])

    kept = [i for i in range(len(rows)) if keep[i]]
    by_source: dict[str, list[int]] = {}
    for i in kept:
        by_source.setdefault(records[i].data_source, []).append(i)
    result = {"predictions": os.path.abspath(preds_path), "rewards": names, "reward_errors": errors,
              "teacher": teacher.path if teacher else None, "overall": group(kept),
              "by_data_source": {src: group(ids) for src, ids in sorted(by_source.items())},
              "skipped": skipped}
    _write_metrics(result, out_dir)
    return result


def _load_teacher(cfg: Config, names: list[str], teacher_path: str, device) -> Optional[LoadedModel]:
    """The teacher model the enabled rewards need (``--teacher``, else ``model.reference_path``, else the
    recipe's model), or None when none does."""
    if not needs_teacher(names):
        return None
    if not teacher_path:
        from fastebm.model.loading import resolve_model_path

        teacher_path = os.path.expanduser(cfg.model.reference_path) or resolve_model_path(cfg.model)
    return load_model(teacher_path, device, cfg.model.dtype, cfg.model.attn_implementation, trainable=False)


def _text_metrics(row: dict, tags) -> tuple[str, dict]:
    """A prediction's lenient answer and its text-only numbers: format (and strict), answer words, tokens."""
    text = row["raw_output"] or ""
    ans = lenient_answer(text, tags)[0] or ""
    fmt = format_reward(text, tags)
    ct = row.get("completion_tokens")
    return ans, {"format": fmt, "format_strict": float(fmt == 5.0), "answer_words": float(len(ans.split())),
                 "completion_tokens": float(ct) if isinstance(ct, (int, float)) else None}


def _write_metrics(result: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "metrics.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(result))


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(result: dict) -> str:
    """The groups as rows, the metrics as columns."""
    groups = [("overall", result["overall"])] + list(result["by_data_source"].items())
    cols = list(result["overall"].keys())
    lines = [f"Metrics of `{result['predictions']}`", "",
             "| group | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, g in groups:
        lines.append(f"| {name} | " + " | ".join(_fmt(g.get(c)) for c in cols) + " |")
    if result["skipped"]:
        lines += ["", f"{len(result['skipped'])} predictions skipped (video failed): see metrics.json"]
    return "\n".join(lines) + "\n"
