"""The EBM record reader on real released records (tests/fixtures, see its README) and bad input."""
import json
import os

import pytest

from fastebm.data import DataError
from fastebm.data.prompts import build_messages, sft_target
from fastebm.data.records import Profiles, RecordSampler, load_records, resolve_video, split_by_session

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def test_reads_released_test_records():
    recs = load_records(os.path.join(FIX, "ebm_test_records.json"))
    assert len(recs) == 4
    r = recs[0]
    assert r.problem_id == 1 and r.session_id == "2d6146a3a3df073e"
    assert r.assistant == "Ron Weasley" and r.user == "Voldemort" and r.data_source == "Harry Potter"
    assert r.dialogue[0].speaker == "Voldemort" and len(r.dialogue) == 3
    assert r.reference_answer.startswith("Shut up!")
    assert r.solution == f"<answer>{r.reference_answer}</answer>"
    assert r.video_path.endswith(".mp4") and r.process is None
    assert r.extra["segment_part"] == "1_000"  # unknown fields are kept


def test_reads_released_cot_records_and_jsonl(tmp_path):
    recs = load_records(os.path.join(FIX, "ebm_cot_records.json"))
    assert recs[0].process.startswith("<vision>") and "</think>" in recs[0].process
    assert sft_target(recs[0]).endswith(recs[0].solution)
    raw = json.load(open(os.path.join(FIX, "ebm_cot_records.json")))
    p = tmp_path / "cot.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in raw) + "\n")
    assert [r.problem_id for r in load_records(str(p))] == [r.problem_id for r in recs]


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.pop("target"), "missing field 'target'"),
    (lambda r: r.update(dialogue="hello"), "field 'dialogue': expected a list"),
    (lambda r: r["dialogue"][1].update(utterance=None), "field 'dialogue[1].utterance'"),
    (lambda r: r["target"].update(utterance="  "), "field 'target.utterance' is empty"),
    (lambda r: r.update(video_path=3), "field 'video_path'"),
])
def test_malformed_record_error_names_file_record_and_field(tmp_path, mutate, field):
    raw = json.load(open(os.path.join(FIX, "ebm_test_records.json")))
    mutate(raw[2])
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(DataError) as e:
        load_records(str(p))
    msg = str(e.value)
    assert str(p) in msg and "record 2" in msg and "problem_id 3" in msg and field in msg


def test_bad_json_names_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_records(str(p))


def test_profiles_default_is_counted(tmp_path):
    p = tmp_path / "profiles.json"
    p.write_text(json.dumps({"Harry Potter": {"Ron Weasley": "Loyal, funny."}}))
    prof = Profiles.load(str(p))
    assert prof.get("Harry Potter", "Ron Weasley") == "Loyal, funny."
    assert prof.get("Harry Potter", "Hermione Granger") == Profiles.NEUTRAL
    assert prof.get("Harry Potter", "Hermione Granger") == Profiles.NEUTRAL
    assert prof.missing == {"Harry Potter/Hermione Granger": 2}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Harry Potter": {"Ron": 3}}))
    with pytest.raises(DataError, match="Harry Potter.Ron"):
        Profiles.load(str(bad))


def test_split_by_session_keeps_sessions_whole():
    recs = load_records(os.path.join(FIX, "ebm_test_records.json")) * 5
    train, val = split_by_session(recs, 0.5, seed=1)
    assert len(train) + len(val) == len(recs)
    assert not {r.session_id for r in train} & {r.session_id for r in val}
    assert split_by_session(recs, 0.5, seed=1) == (train, val)  # stable


def test_prompt_has_role_profile_format_video_and_dialogue():
    r = load_records(os.path.join(FIX, "ebm_test_records.json"))[0]
    msgs = build_messages(r, "Loyal, funny.", ("perception", "think", "answer"), max_history_turns=2)
    system, user = msgs[0]["content"], msgs[1]["content"]
    assert "Ron Weasley" in system and "Harry Potter" in system and "Loyal, funny." in system
    assert "<perception>" in system and "</answer>" in system and "<vision>" not in system
    assert user[0] == {"type": "video"}
    text = user[1]["text"]
    assert r.dialogue[-1].utterance in text and r.dialogue[0].utterance not in text  # last 2 turns only
    assert r.target.utterance not in text


def test_resolve_video_relative_to_records_or_root():
    r = load_records(os.path.join(FIX, "ebm_test_records.json"))[0]
    assert resolve_video(r).startswith(FIX)
    assert resolve_video(r, "/data/ebm") == os.path.normpath("/data/ebm/" + r.video_path)


@pytest.mark.parametrize("path", ["../outside.mp4", "/etc/passwd", "videos/../../x.mp4"])
def test_video_path_is_confined_to_the_video_root(path):
    import dataclasses

    r = dataclasses.replace(load_records(os.path.join(FIX, "ebm_test_records.json"))[0], video_path=path)
    with pytest.raises(DataError, match=rf"record 0 .*field 'video_path' = '{path}' leads outside the video "
                                        rf"root /data/ebm .*data.allow_outside_root"):
        resolve_video(r, "/data/ebm")
    assert resolve_video(r, "/data/ebm", allow_outside_root=True) == os.path.normpath(os.path.join("/data/ebm", path))
    assert resolve_video(dataclasses.replace(r, video_path="videos/../v.mp4"), "/data/ebm") == "/data/ebm/v.mp4"


def test_data_check_reports_a_video_path_outside_the_root(tmp_path):
    import io

    from fastebm.data.check import check_records

    recs = json.load(open(os.path.join(FIX, "ebm_test_records.json")))[:1]
    recs[0]["video_path"] = "/etc/passwd"
    (tmp_path / "r.json").write_text(json.dumps(recs))
    out = io.StringIO()
    assert not check_records(str(tmp_path / "r.json"), out=out)
    assert "leads outside the video root" in out.getvalue()


def test_sampler_is_deterministic_and_resumable():
    a = RecordSampler(7, seed=3)
    seq = [a.next() for _ in range(20)]
    assert sorted(seq[:7]) == list(range(7)) and seq[:7] != seq[7:14]
    b = RecordSampler(7, seed=3)
    [b.next() for _ in range(9)]
    c = RecordSampler(7, seed=3)
    c.load_state(b.state())
    assert c.peek(11) == seq[9:20] and c.state() == b.state()  # peeking crosses the epoch, moves nothing
    assert [c.next() for _ in range(11)] == seq[9:]
