"""The LLM-judge protocols: absolute scores (``fastebm eval judge``) and pairwise preferences
(``fastebm eval pairwise``), on predictions files written by ``fastebm generate``.

Both judge the character's spoken line only (the lenient answer, ``fastebm.eval.extract``), with
the clip's frames (8, at most 512 px, ``fastebm.eval.frames``), the movie, the two characters and
their profiles, the dialogue and the reference line. Samples: the ids common to every file,
sorted, shuffled with ``--seed``, the first ``--samples``. A sample whose clip cannot be read is
skipped (listed in the output), as the release drops it.

Absolute (templates ``judge_system.txt`` + ``judge_absolute.txt``), ONE request per sample: the
non-empty responses of every file, shuffled and labelled A, B, … (the order is seeded per sample),
each scored 0–100 on three metrics from weighted sub-scores (``CRITERIA``; fastebm computes the
weighted score, a bare number per metric is taken as the score). An empty answer scores 0 on
every metric and is not shown. Labels the reply misses are asked for again (``Asker``). Per file:
the mean of each metric, a 95 % bootstrap interval and the count; failed labels are counted and
left out of the means (the release scores them 0).

Pairwise (``judge_pairwise.txt``), TWO requests per sample: anchor as A then opponent as A. Each
reply gives ``{"VEG": "A"|"B"|"tie", "CN": …, "SPC": …}``; per metric the two verdicts, turned into
anchor / opponent / tie, combine as the release does: the same twice wins, a tie and a win give the
win, contradictory verdicts are a tie. A judge that always prefers the first position thus yields
ties, not wins. Both empty: a tie on every metric, one empty: the other wins, without asking. Per
metric: win, loss, tie (the anchor's side), errors, the rates, net win rate (win − loss) / (win +
loss + tie), decisive win rate win / (win + loss), and the exact two-sided binomial p-value of win
among win + loss (ties excluded; ``scipy.stats.binomtest``).
"""
from __future__ import annotations

import json
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from fastebm.data import DataError
from fastebm.data.video import VideoError
from fastebm.eval.extract import lenient_answer
from fastebm.eval.frames import FrameCache
from fastebm.eval.generate import item_seed, load_predictions
from fastebm.eval.judge_client import Asker, json_object
from fastebm.eval.progress import Progress
from fastebm.eval.stats import bootstrap_ci, mean, sign_test_p_value
from fastebm.eval.templates import render_template

log = logging.getLogger("fastebm")

METRICS = ("VEG", "CN", "SPC")
CRITERIA = {
    "VEG": {"triggering": 0.5, "integrity": 0.3, "temporal": 0.2},   # visual evidence grounding
    "CN": {"oral": 0.6, "anti_narrative": 0.4},                       # conversational naturalism
    "SPC": {"values": 0.4, "style": 0.3, "stakes": 0.3},              # situational persona compatibility
}
"""The release's sub-criteria and weights; a metric's score is the weighted sum of its sub-scores."""


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelPreds:
    name: str
    path: str
    rows: dict  # id -> predictions row


def load_model_preds(specs: Sequence[str]) -> list[ModelPreds]:
    """``NAME=PATH`` or ``PATH`` (named after the file) per predictions file; names must differ."""
    out, names = [], set()
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else ("", spec)
        name = name or os.path.splitext(os.path.basename(path))[0]
        if name in names:
            raise DataError(f"{path}: the model name {name!r} is used twice; name the files NAME=PATH")
        names.add(name)
        rows = load_predictions(path, need=("id", "raw_output", "record", "video"))
        by_id = {}
        for row in rows:
            by_id[str(row["id"])] = row
        out.append(ModelPreds(name, path, by_id))
    return out


def select_samples(models: Sequence[ModelPreds], samples: int, seed: int) -> list[str]:
    """The ids every file has, sorted, shuffled with ``seed``, the first ``samples`` (0: all)."""
    common = set.intersection(*(set(m.rows) for m in models))
    if not common:
        raise DataError("the predictions files have no id in common: " + ", ".join(m.path for m in models))
    ids = sorted(common)
    random.Random(seed).shuffle(ids)
    return ids[:samples] if samples > 0 else ids


def answer_of(row: dict) -> str:
    """The line a judge reads: the row's lenient answer (recomputed with the default tags if absent)."""
    if "answer" in row:
        return (row["answer"] or "").strip()
    return (lenient_answer(row.get("raw_output") or "")[0] or "").strip()


def context_values(row: dict) -> dict:
    """Placeholders shared by the judge templates, from a predictions row's record and profiles."""
    rec, prof = row["record"], row.get("profiles") or {}
    dialogue = "\n".join(f"{t.get('speaker', '?')}: {t.get('utterance', '')}" for t in rec.get("dialogue", []))
    return dict(assistant=rec.get("assistant", "the character"), user=rec.get("user", "the other character"),
                data_source=rec.get("data_source", "an unknown film"),
                assistant_profile=prof.get("assistant") or "(no profile)",
                user_profile=prof.get("user") or "(no profile)",
                dialogue=dialogue or "(the scene opens)", reference=(rec.get("target") or {}).get("utterance", ""))


def judge_messages(system: str, text: str, frames: Sequence[str]) -> list[dict]:
    """The request: the system text, then one user turn with the frames (image parts) and the text."""
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in frames]
    return [{"role": "system", "content": system},
            {"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _run(jobs, fn, concurrency: int, desc: str, progress: bool) -> list:
    """``fn(job)`` for every job on ``concurrency`` threads; results in job order."""
    bar = Progress(len(jobs), desc, progress)
    results = [None] * len(jobs)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = [pool.submit(fn, j) for j in jobs]
        for i, fut in enumerate(futures):
            results[i] = fut.result()  # a JudgeError (e.g. a wrong key) stops the run here
            bar.advance(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the questions not started yet are dropped
        bar.close()
    return results


def _write(out_dir: str, name: str, result: dict, details: list[dict]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}_samples.jsonl"), "w", encoding="utf-8") as f:
        for d in details:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    return path


def _is_score(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 100


# ----------------------------------------------------------------------------------------------
# Absolute
# ----------------------------------------------------------------------------------------------


def metric_score(metric: str, value) -> tuple[Optional[float], Optional[str]]:
    """A metric's 0–100 score from its reply value: the weighted sub-scores, or a bare number."""
    if _is_score(value):
        return float(value), None
    if not isinstance(value, dict):
        return None, f"{metric} must be an object of sub-scores 0-100"
    subs = CRITERIA[metric]
    bad = [k for k in subs if not _is_score(value.get(k))]
    if bad:
        return None, f"{metric}: sub-scores {', '.join(bad)} must be numbers from 0 to 100"
    return sum(w * float(value[k]) for k, w in subs.items()), None


def parse_absolute(reply: str, labels: Sequence[str]) -> tuple[dict, list[str]]:
    """``({label: {metric: score}}, problems)`` for the labels the reply scores completely."""
    obj, err = json_object(reply)
    if err:
        return {}, [err]
    values, problems = {}, []
    for label in labels:
        entry = obj.get(label, obj.get(f"Response {label}"))
        if entry is None:
            continue
        if not isinstance(entry, dict):
            problems.append(f"{label} must be an object with {', '.join(METRICS)}")
            continue
        scores, errs = {}, []
        for m in METRICS:
            s, e = metric_score(m, entry.get(m))
            if e:
                errs.append(f"{label}: {e}")
            else:
                scores[m] = s
        if errs:
            problems += errs
        else:
            values[label] = scores
    return values, problems


def absolute_example(labels: Sequence[str]) -> str:
    """The reply example shown in the absolute template, for these labels."""
    entry = {m: {k: 0 for k in subs} for m, subs in CRITERIA.items()}
    return json.dumps({label: entry for label in labels})


def judge_absolute(models: Sequence[ModelPreds], asker: Asker, out_dir: str, *, samples: int = 100, seed: int = 0,
                   frames: Optional[FrameCache] = None, concurrency: int = 8, template_dir: str = "",
                   progress: bool = True, judge_info: Optional[dict] = None) -> dict:
    """``fastebm eval judge``: see the module docstring. Writes ``judge.json`` and ``judge_samples.jsonl``."""
    frames = frames or FrameCache()
    ids = select_samples(models, samples, seed)
    system = render_template("judge_system.txt", {}, template_dir)
    names = [m.name for m in models]

    def one(sid: str) -> dict:
        rows = {m.name: m.rows[sid] for m in models}
        answers = {n: answer_of(rows[n]) for n in names}
        detail = {"id": sid, "scores": {n: {m: 0.0 for m in METRICS} for n in names if not answers[n]},
                  "empty": [n for n in names if not answers[n]], "failed": [], "labels": {}, "replies": []}
        shown = [n for n in names if answers[n]]
        if not shown:
            return detail
        try:
            urls = frames.get(rows[names[0]]["video"])
        except VideoError as e:
            return {"id": sid, "skipped": e.reason}
        random.Random(item_seed(seed, sid)).shuffle(shown)   # anonymised, order seeded per sample
        labels = [chr(ord("A") + i) for i in range(len(shown))]
        block = "\n\n".join(f"Response {lab}:\n{answers[n]}" for lab, n in zip(labels, shown))
        values = dict(context_values(rows[names[0]]), responses=block, labels=", ".join(labels),
                      num_responses=len(labels), example=absolute_example(labels))
        text = render_template("judge_absolute.txt", values, template_dir)
        ans = asker.ask(judge_messages(system, text, urls), lambda r: parse_absolute(r, labels), labels)
        for lab, n in zip(labels, shown):
            if lab in ans.values:
                detail["scores"][n] = ans.values[lab]
            else:
                detail["failed"].append(n)
        detail["labels"] = dict(zip(labels, shown))
        detail["replies"] = ans.replies
        return detail

    details = _run(ids, one, concurrency, "judge", progress)
    judged = [d for d in details if "skipped" not in d]
    per_model = {}
    for i, m in enumerate(models):
        entry = {"file": os.path.abspath(m.path)}
        for metric in METRICS:
            xs = [d["scores"][m.name][metric] for d in judged if m.name in d["scores"]]
            entry[metric] = {"mean": mean(xs), "ci95": bootstrap_ci(xs, seed=seed + i), "n": len(xs)}
        entry["samples"] = sum(1 for d in judged if m.name in d["scores"])
        entry["empty"] = sum(1 for d in judged if m.name in d["empty"])
        entry["failed"] = sum(1 for d in judged if m.name in d["failed"])
        per_model[m.name] = entry
    result = {"protocol": "absolute", "judge": judge_info or asker.judge.identity, "seed": seed,
              "samples_requested": samples, "samples": len(judged), "metrics": list(METRICS),
              "criteria": CRITERIA, "models": per_model,
              "skipped": [{"id": d["id"], "reason": d["skipped"]} for d in details if "skipped" in d],
              "requests": asker.stats.to_dict()}
    _write(out_dir, "judge", result, details)
    return result


# ----------------------------------------------------------------------------------------------
# Pairwise
# ----------------------------------------------------------------------------------------------

_VERDICTS = {"a": "A", "b": "B", "tie": "tie"}


def parse_pairwise(reply: str) -> tuple[dict, list[str]]:
    """``({metric: "A"|"B"|"tie"}, problems)`` for the metrics the reply decides."""
    obj, err = json_object(reply)
    if err:
        return {}, [err]
    values, problems = {}, []
    for m in METRICS:
        v = obj.get(m)
        if v is None:
            continue
        verdict = _VERDICTS.get(v.strip().lower()) if isinstance(v, str) else None
        if verdict is None:
            problems.append(f'{m} must be "A", "B" or "tie", got {json.dumps(v)}')
        else:
            values[m] = verdict
    return values, problems


def combine_verdicts(first: str, second: str) -> str:
    """Two verdicts of one pair (each ``anchor`` / ``opponent`` / ``tie``, positions already undone)
    as the release combines them: the same twice wins, a tie and a win give the win, a contradiction
    is a tie."""
    if first == second:
        return first
    if first == "tie":
        return second
    if second == "tie":
        return first
    return "tie"


def pairwise_stats(outcomes: Sequence[Optional[str]]) -> dict:
    """Counts and rates of one metric's outcomes (``anchor`` / ``opponent`` / ``tie``; None: error)."""
    win, loss = outcomes.count("anchor"), outcomes.count("opponent")
    tie, errors = outcomes.count("tie"), outcomes.count(None)
    n = win + loss + tie
    return {"win": win, "loss": loss, "tie": tie, "errors": errors, "n": n,
            "win_rate": win / n if n else None, "loss_rate": loss / n if n else None,
            "tie_rate": tie / n if n else None, "net_win_rate": (win - loss) / n if n else None,
            "decisive_win_rate": win / (win + loss) if win + loss else None,
            "p_value": sign_test_p_value(win, loss)}


def judge_pairwise(anchor: ModelPreds, opponent: ModelPreds, asker: Asker, out_dir: str, *, samples: int = 500,
                   seed: int = 42, frames: Optional[FrameCache] = None, concurrency: int = 8, template_dir: str = "",
                   progress: bool = True, judge_info: Optional[dict] = None) -> dict:
    """``fastebm eval pairwise``: see the module docstring. Writes ``pairwise.json`` and ``pairwise_samples.jsonl``."""
    frames = frames or FrameCache()
    ids = select_samples([anchor, opponent], samples, seed)
    system = render_template("judge_system.txt", {}, template_dir)

    def one(sid: str) -> dict:
        ra, ro = anchor.rows[sid], opponent.rows[sid]
        a, o = answer_of(ra), answer_of(ro)
        if not a or not o:  # decided without the judge: an empty line never wins
            outcome = "tie" if not a and not o else ("anchor" if a else "opponent")
            return {"id": sid, "outcome": {m: outcome for m in METRICS}, "without_judge": True}
        try:
            urls = frames.get(ra["video"])
        except VideoError as e:
            return {"id": sid, "skipped": e.reason}
        base = context_values(ra)
        verdicts, replies = [], []
        orders = ((a, o, {"A": "anchor", "B": "opponent", "tie": "tie"}),   # anchor shown first
                  (o, a, {"A": "opponent", "B": "anchor", "tie": "tie"}))   # then the positions swapped
        for first, second, side in orders:
            text = render_template("judge_pairwise.txt", dict(base, response_a=first, response_b=second), template_dir)
            ans = asker.ask(judge_messages(system, text, urls), parse_pairwise, METRICS)
            verdicts.append({m: side.get(ans.values.get(m)) for m in METRICS})  # None: the judge failed it
            replies.append(ans.replies)
        outcome = {m: (combine_verdicts(verdicts[0][m], verdicts[1][m])
                       if verdicts[0][m] is not None and verdicts[1][m] is not None else None) for m in METRICS}
        return {"id": sid, "outcome": outcome, "orders": verdicts, "replies": replies}

    details = _run(ids, one, concurrency, "pairwise", progress)
    judged = [d for d in details if "skipped" not in d]
    agreement = {"consistent": 0, "tie_and_win": 0, "contradictory": 0}
    for d in judged:
        for m in METRICS:
            if "orders" not in d or d["orders"][0][m] is None or d["orders"][1][m] is None:
                continue
            v1, v2 = d["orders"][0][m], d["orders"][1][m]
            agreement["consistent" if v1 == v2 else "tie_and_win" if "tie" in (v1, v2) else "contradictory"] += 1
    result = {"protocol": "pairwise", "judge": judge_info or asker.judge.identity, "seed": seed,
              "anchor": {"name": anchor.name, "file": os.path.abspath(anchor.path)},
              "opponent": {"name": opponent.name, "file": os.path.abspath(opponent.path)},
              "samples_requested": samples, "samples": len(judged),
              "metrics": {m: pairwise_stats([d["outcome"][m] for d in judged]) for m in METRICS},
              "agreement": agreement,
              "skipped": [{"id": d["id"], "reason": d["skipped"]} for d in details if "skipped" in d],
              "requests": asker.stats.to_dict()}
    _write(out_dir, "pairwise", result, details)
    return result
