"""The released EBM record format, read natively and validated.

A records file is a JSON array (``test.json``, ``cot.json``) or JSONL. Each record has (DESIGN.md
§6): ``problem_id``, ``session_id``, ``data_source``, ``user``, ``assistant``, ``dialogue`` (list of
``{speaker, utterance}``), ``target`` (``{speaker, utterance}``), ``video_path`` (relative),
``problem_type``, ``solution`` (``<answer>…</answer>``), ``generation_type`` and, in CoT files,
``process`` (``<vision>…</vision>\\n\\n<think>…</think>``). Other fields are kept but unused.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from fastebm.data import DataError
from fastebm.data.profiles import Profiles  # noqa: F401  (re-exported: its home was this module)


@dataclass
class Turn:
    speaker: str
    utterance: str


@dataclass
class Record:
    problem_id: Any
    session_id: str
    data_source: str
    user: str
    assistant: str
    dialogue: list[Turn]
    target: Turn
    video_path: str
    solution: str = ""
    problem_type: str = "free-form"
    generation_type: str = ""
    process: Optional[str] = None
    source_file: str = ""
    index: int = -1            # position in source_file
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source_file}: record {self.index} (problem_id {self.problem_id})"

    @property
    def reference_answer(self) -> str:
        """The line the character actually says (the accuracy and PCG target)."""
        return self.target.utterance


_REQUIRED = {
    "session_id": (str, int), "data_source": str, "user": str, "assistant": str,
    "dialogue": list, "target": dict, "video_path": str,
}
_OPTIONAL = {"problem_id": (str, int), "solution": str, "problem_type": str, "generation_type": str,
             "process": str}


def _typename(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join({str: "a string", int: "an integer", list: "a list", dict: "an object"}[x] for x in ts)


def _turn(obj: Any, where: str, name: str) -> Turn:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: field '{name}': expected an object with speaker and utterance, got {obj!r}")
    for k in ("speaker", "utterance"):
        if not isinstance(obj.get(k), str):
            raise DataError(f"{where}: field '{name}.{k}': expected a string, got {obj.get(k)!r}")
    return Turn(obj["speaker"], obj["utterance"])


def parse_record(obj: Any, source_file: str, index: int) -> Record:
    """Validate one raw record; the error names the file, the record and the field."""
    pid = obj.get("problem_id", "?") if isinstance(obj, dict) else "?"
    where = f"{source_file}: record {index} (problem_id {pid})"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for k, t in _REQUIRED.items():
        if k not in obj:
            raise DataError(f"{where}: missing field '{k}'")
        if not isinstance(obj[k], t) or isinstance(obj[k], bool):
            raise DataError(f"{where}: field '{k}': expected {_typename(t)}, got {obj[k]!r}")
    for k, t in _OPTIONAL.items():
        if obj.get(k) is not None and not isinstance(obj[k], t):
            raise DataError(f"{where}: field '{k}': expected {_typename(t)}, got {obj[k]!r}")
    if not obj["video_path"].strip():
        raise DataError(f"{where}: field 'video_path' is empty")
    dialogue = [_turn(t, where, f"dialogue[{i}]") for i, t in enumerate(obj["dialogue"])]
    target = _turn(obj["target"], where, "target")
    if not target.utterance.strip():
        raise DataError(f"{where}: field 'target.utterance' is empty")
    known = set(_REQUIRED) | set(_OPTIONAL)
    return Record(
        problem_id=obj.get("problem_id", index), session_id=str(obj["session_id"]),
        data_source=obj["data_source"], user=obj["user"], assistant=obj["assistant"], dialogue=dialogue,
        target=target, video_path=obj["video_path"], solution=obj.get("solution") or "",
        problem_type=obj.get("problem_type") or "free-form", generation_type=obj.get("generation_type") or "",
        process=obj.get("process"), source_file=source_file, index=index,
        extra={k: v for k, v in obj.items() if k not in known},
    )


def read_raw(path: str) -> list:
    """The raw objects of a JSON-array or JSONL file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: records file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        return data
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON: {e}") from None
    return out


def load_records(path: str) -> list[Record]:
    """All records of ``path``, each validated (the first bad one raises DataError naming it)."""
    return [parse_record(obj, path, i) for i, obj in enumerate(read_raw(path))]


def load_usable_records(path: str, on_bad, require=None) -> list[Record]:
    """Every record of ``path`` that parses (and passes ``require(record)``, which raises ValueError
    otherwise); each bad one goes to ``on_bad(file=, record=, reason=)`` — skipped, never fatal
    alone. No usable record at all is a DataError."""
    good = []
    for i, obj in enumerate(read_raw(path)):
        try:
            rec = parse_record(obj, path, i)
            if require is not None:
                require(rec)
            good.append(rec)
        except (DataError, ValueError) as e:
            on_bad(file=path, record=i, reason=str(e))
    if not good:
        raise DataError(f"{path}: no usable records (every one is malformed; see the run's skipped.jsonl)")
    return good


def resolve_video(record: Record, video_root: str = "", allow_outside_root: bool = False) -> str:
    """Absolute path of a record's video: relative to ``video_root`` or to the records file's folder.

    The path must stay inside that root (``data.allow_outside_root``): an absolute ``video_path`` or one
    whose ``..`` climbs out is a DataError naming the record, so a records file cannot make the trainer
    open any file it can read. The check is on the path's text (``..`` resolved, symbolic links not
    followed): a link inside the root is the root owner's choice.
    """
    root = os.path.abspath(os.path.expanduser(video_root) if video_root
                           else os.path.dirname(os.path.abspath(record.source_file)))
    path = os.path.normpath(os.path.join(root, record.video_path))
    if not allow_outside_root and os.path.commonpath([root, path]) != root:
        raise DataError(f"{record.where}: field 'video_path' = {record.video_path!r} leads outside the video root "
                        f"{root} (to {path}); set data.allow_outside_root = true if that is intended")
    return path


def split_by_session(records: list[Record], val_fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Train/validation split by ``session_id`` (a session never straddles the split).

    A session goes to validation when a seeded hash of its id falls under ``val_fraction``: stable
    across runs and independent of record order.
    """
    if val_fraction <= 0:
        return list(records), []

    def u(sid: str) -> float:
        h = hashlib.sha256(f"{seed}:{sid}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    train = [r for r in records if u(r.session_id) >= val_fraction]
    val = [r for r in records if u(r.session_id) < val_fraction]
    return train, val


class RecordSampler:
    """Deterministic, resumable order over records: a seeded permutation per epoch.

    ``state()``/``load_state()`` capture (epoch, position), so a resumed run continues mid-epoch
    with exactly the records the uninterrupted run would have seen.
    """

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise DataError("no training records")
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self) -> list[int]:
        perm = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(perm)
        return perm

    def next(self) -> int:
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make_perm()
        i = self._perm[self.pos]
        self.pos += 1
        return i

    def peek(self, k: int) -> list[int]:
        """The next ``k`` indices, without advancing (for decoding ahead)."""
        out, epoch, pos, perm = [], self.epoch, self.pos, self._perm
        for _ in range(k):
            if pos >= self.n:
                epoch, pos = epoch + 1, 0
                saved, self.epoch = self.epoch, epoch
                perm = self._make_perm()
                self.epoch = saved
            out.append(perm[pos])
            pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state(self, s: dict) -> None:
        if s["n"] != self.n:
            raise DataError(f"checkpoint data position is for {s['n']} records, this run has {self.n}")
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = self._make_perm()
