"""fastebm generate (in-process): the rows, the release's sampling defaults, outputs independent of the
batch and of a resume, an interrupted line redone, bad videos and records skipped and recorded."""
import json
import os
import shutil

import pytest

from fastebm.config import load_config
from fastebm.data import DataError
from fastebm.data.records import parse_record, read_raw, resolve_video
from fastebm.data.synth import write_bad_video
from fastebm.eval.extract import lenient_answer
from fastebm.eval.generate import Sampling, generate_predictions, read_jsonl, skipped_path_for

from evalpaths import TINY


def rows_by_id(path):
    return {r["id"]: r for r in read_jsonl(path)}


def test_eval_sampling_defaults_are_the_releases():
    s = Sampling.from_config(load_config(TINY))
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (0.7, 0.9, 0, 2048)
    s = Sampling.from_config(load_config(TINY, ["eval.temperature=0", "eval.max_new_tokens=5", "run.seed=3"]))
    assert (s.temperature, s.max_new_tokens, s.seed) == (0.0, 5, 3)


def test_generate_rows(preds, sample, policy_path):
    rows = read_jsonl(preds)
    raw = read_raw(sample["train"])
    profiles = json.load(open(sample["profiles"]))
    assert [r["id"] for r in rows] == [str(x["problem_id"]) for x in raw[:4]]
    for i, r in enumerate(rows):
        rec = parse_record(raw[i], sample["train"], i)
        assert r["video"] == resolve_video(rec) and os.path.isfile(r["video"])
        assert (r["answer"], r["answer_tagged"]) == lenient_answer(r["raw_output"])
        assert r["data_source"] == rec.data_source and r["prompt_mode"] == "ebm" and r["model"] == policy_path
        assert 0 < r["completion_tokens"] <= 12 and r["prompt_tokens"] > 100 and r["time_s"] >= 0
        assert r["truncated"] == (r["completion_tokens"] == 12) or r["completion_tokens"] < 12
        assert r["sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 12, "seed": 0}
        assert parse_record(r["record"], "x", 0) == parse_record(raw[i], "x", 0)  # the record, whole
        assert r["profiles"]["assistant"] == profiles[rec.data_source].get(rec.assistant, r["profiles"]["assistant"])
        assert isinstance(r["format_reward"], float) and "vision" in r and "think" in r


def test_outputs_do_not_depend_on_batch_size_or_resume(preds, tiny_cfg, policy_path, sample, tmp_path):
    out = str(tmp_path / "p.jsonl")
    cfg = tiny_cfg("eval.batch_size=1")
    st = generate_predictions(cfg, model_path=policy_path, records_path=sample["train"], out_path=out, limit=2,
                              progress=False)
    assert (st.generated, st.already_done) == (2, 0)
    st = generate_predictions(cfg, model_path=policy_path, records_path=sample["train"], out_path=out, limit=4,
                              progress=False)
    assert (st.generated, st.already_done) == (2, 2)  # resumed: only the two missing ids
    a, b = rows_by_id(preds), rows_by_id(out)
    assert list(b) == list(a)
    assert [b[k]["raw_output"] for k in b] == [a[k]["raw_output"] for k in a]


@pytest.mark.slow
def test_greedy_is_the_same_on_the_shared_prefix_and_hf_generate(tiny_cfg, policy_path, sample, tmp_path):
    outs = []
    for sp in ("true", "false"):
        out = str(tmp_path / f"{sp}.jsonl")
        generate_predictions(tiny_cfg("eval.temperature=0", f"rollout.shared_prefix={sp}"), model_path=policy_path,
                             records_path=sample["train"], out_path=out, limit=3, progress=False)
        outs.append([r["raw_output"] for r in read_jsonl(out)])
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_an_interrupted_last_line_is_generated_again(preds, tiny_cfg, policy_path, sample, tmp_path):
    out = str(tmp_path / "cut.jsonl")
    shutil.copy(preds, out)
    data = open(out, "rb").read()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    open(out, "wb").write(data[:last + (len(data) - last) // 2])  # half of the last line, no newline
    st = generate_predictions(tiny_cfg(), model_path=policy_path, records_path=sample["train"], out_path=out,
                              limit=4, progress=False)
    assert (st.generated, st.already_done) == (1, 3)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(out)) == strip(read_jsonl(preds))  # the same line, whole again


def test_bad_videos_and_records_are_skipped_and_recorded(tiny_cfg, policy_path, sample, tmp_path):
    raw = read_raw(sample["train"])[:5]
    root = os.path.dirname(sample["train"])
    shutil.copy(os.path.join(root, raw[0]["video_path"]), tmp_path / "good.mp4")
    raw[0]["video_path"] = "good.mp4"  # paths relative to the records file's folder, the video root
    write_bad_video(str(tmp_path / "broken.webm"), "truncated")
    raw[1]["video_path"] = "broken.webm"
    raw[2]["video_path"] = "missing.mp4"
    del raw[3]["target"]  # malformed record
    raw[4]["video_path"] = os.path.join(root, raw[4]["video_path"])  # leaves the root: refused, never opened
    records = tmp_path / "records.json"
    records.write_text(json.dumps(raw))
    out = str(tmp_path / "out.jsonl")
    st = generate_predictions(tiny_cfg(), model_path=policy_path, records_path=str(records), out_path=out,
                              progress=False)
    assert (st.generated, st.skipped) == (1, 2)
    assert [r["id"] for r in read_jsonl(out)] == [str(raw[0]["problem_id"])]
    skipped = read_jsonl(skipped_path_for(out))
    by = {s.get("id", s.get("record")): s for s in skipped}
    assert by[str(raw[1]["problem_id"])]["file"].endswith("broken.webm")
    assert "file not found" in by[str(raw[2]["problem_id"])]["reason"]
    assert "missing field 'target'" in by[3]["reason"]
    assert "leads outside the video root" in by[4]["reason"]


def test_repeated_ids_are_refused(tiny_cfg, policy_path, sample, tmp_path):
    raw = read_raw(sample["train"])[:2]
    raw[1]["problem_id"] = raw[0]["problem_id"]
    records = tmp_path / "dup.json"
    records.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"dup.json: record 1: problem_id 1 repeats record 0"):
        generate_predictions(tiny_cfg(), model_path=policy_path, records_path=str(records),
                             out_path=str(tmp_path / "o.jsonl"), progress=False)
