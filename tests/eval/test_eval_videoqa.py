"""fastebm eval videoqa: small files in each benchmark's official format, made here with real encoded
clips; the readers, the release's frame counts, and accuracy / per-type numbers recomputed from
predictions.jsonl (by an independent scorer) equal metrics.json. Part of each predictions file is
written beforehand with known answers (a resumed run), so the numbers are not all zero."""
import csv
import json
import os
import re

import pytest
from PIL import Image

from fastebm.data import DataError
from fastebm.data.synth import synthetic_frames, write_synthetic_clip
from fastebm.eval.generate import read_jsonl
from fastebm.eval.videoqa import read_activitynet, read_nextqa, read_pororoqa, run_videoqa, score, videoqa_metrics

MC = ["a red square", "a green disc", "a blue bar", "nothing", "two shapes"]


def clip(path, frames=40, codec="h264", seed=0):
    return write_synthetic_clip(str(path), codec=codec, width=96, height=72, num_frames=frames, fps=10, seed=seed)


def gif(path, frames=9, seed=0):
    ims = [Image.fromarray(f) for f in synthetic_frames(width=80, height=60, num_frames=frames, seed=seed)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=100, loop=0)
    return path


def my_score(bench, raw, gold):
    """The release's scoring, written out again here."""
    m = re.search(r"<answer>\s*(.*?)\s*</answer>", raw, re.S | (re.I if bench == "activitynet" else 0))
    if bench == "activitynet":
        pred = m.group(1).strip().lower() if m else (re.findall(r"\b(yes|no)\b", raw.lower()) or [None])[-1]
        return pred, pred == gold
    pred = m.group(1).strip() if m else None
    return pred, pred == gold


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    d = tmp_path_factory.mktemp("videoqa")
    # NExT-QA: csv + {video}.mp4; one video mapped elsewhere, one missing
    nx = d / "nextqa"
    clip(nx / "1001.mp4", 40, seed=1)
    clip(nx / "1002.mp4", 20, seed=2)
    clip(nx / "elsewhere" / "renamed.mp4", 40, seed=3)
    rows = [("1001", 0, "CH", 2), ("1001", 1, "CW", 0), ("1002", 0, "TN", 4), ("1003", 0, "CH", 1),
            ("1004", 0, "TC", 3)]
    with open(nx / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
                    "a0", "a1", "a2", "a3", "a4"])
        for video, qid, typ, ans in rows:
            w.writerow([video, 40, 96, 72, f"what moves in {video}?", ans, qid, typ, *MC])
    (nx / "map.json").write_text(json.dumps({"1003": "elsewhere/renamed.mp4"}))
    # ActivityNet-QA: test_q.json + test_a.json; clips named v_<name> or <name>, any extension
    an = d / "anet"
    clip(an / "v_abcDEF.mp4", 40, seed=4)
    clip(an / "ghi_jkl.webm", 36, codec="vp9", seed=5)
    qs = [{"video_name": "abcDEF", "question_id": "v_abcDEF_0", "question": "is it red"},
          {"video_name": "abcDEF", "question_id": "v_abcDEF_1", "question": "what color is it"},
          {"video_name": "ghi_jkl", "question_id": "v_ghi_jkl_0", "question": "is it moving"},
          {"video_name": "ghi_jkl", "question_id": "v_ghi_jkl_1", "question": "is it outdoors"}]
    ans = [{"question_id": "v_abcDEF_0", "answer": "yes", "type": 3},
           {"question_id": "v_abcDEF_1", "answer": "red", "type": 4},
           {"question_id": "v_ghi_jkl_0", "answer": "No", "type": 3},
           {"question_id": "v_ghi_jkl_1", "answer": "no", "type": 3}]
    (an / "test_q.json").write_text(json.dumps(qs))
    (an / "test_a.json").write_text(json.dumps(ans))
    # PororoQA: {"PororoQA": [...]}; scenes of GIFs (and, in one scene, WebM clips) around supporting_num
    po = d / "pororo"
    for i in (1, 2, 3):
        gif(str(po / "Pororo_ENGLISH1_1" / "Pororo_ENGLISH1_1_ep1" / f"{i}.gif"), seed=i)
    for i in (9, 10):
        clip(po / "Pororo_ENGLISH2_3" / "Pororo_ENGLISH2_3_ep7" / f"{i}.webm", 12, codec="vp9", seed=i)
    items = [{"qid": 0, "question": "who is there?", **{f"answer{j}": MC[j] for j in range(5)}, "correct_idx": 1,
              "video_name": "Pororo_ENGLISH1_1_ep1", "supporting_num": "1"},
             {"qid": 1, "question": "what is it?", **{f"answer{j}": MC[j] for j in range(5)}, "correct_idx": 3,
              "video_name": "Pororo_ENGLISH1_1_ep1", "supporting_num": "2"},
             {"qid": 2, "question": "where?", **{f"answer{j}": MC[j] for j in range(5)}, "correct_idx": 0,
              "video_name": "Pororo_ENGLISH2_3_ep7", "supporting_num": "12"}]
    (po / "qa_subset.json").write_text(json.dumps({"PororoQA": items}))
    return d


def test_readers(benches):
    d = benches
    nx = read_nextqa(str(d / "nextqa" / "val.csv"), str(d / "nextqa"),
                     json.load(open(d / "nextqa" / "map.json")))
    assert [q.qid for q in nx] == ["1001_0", "1001_1", "1002_0", "1003_0", "1004_0"]
    assert nx[0].options == MC and nx[0].answer == "2" and nx[0].type == "CH"
    assert nx[3].videos == (str(d / "nextqa" / "elsewhere" / "renamed.mp4"),)
    assert nx[4].videos == (str(d / "nextqa" / "1004.mp4"),)
    an = read_activitynet(str(d / "anet" / "test_q.json"), str(d / "anet"))  # answers found beside: test_a.json
    assert [(q.qid, q.answer, q.type) for q in an] == [("v_abcDEF_0", "yes", "3"), ("v_ghi_jkl_0", "no", "3"),
                                                        ("v_ghi_jkl_1", "no", "3")]
    assert an[0].videos[0].endswith("v_abcDEF.mp4") and an[1].videos[0].endswith("ghi_jkl.webm")
    assert an[0].options is None
    po = read_pororoqa(str(d / "pororo" / "qa_subset.json"), str(d / "pororo"))
    assert [len(q.videos) for q in po] == [3, 3, 2] and po[0].answer == "1"
    assert [os.path.basename(v) for v in po[2].videos] == ["9.webm", "10.webm"]


def test_reader_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("video,question,answer,qid,type,a0,a1,a2,a3\n1,q,9,0,CH,a,b,c,d\n")
    with pytest.raises(DataError, match=r"bad.csv: missing column\(s\) a4"):
        read_nextqa(str(bad), str(tmp_path))
    bad.write_text("video,question,answer,qid,type,a0,a1,a2,a3,a4\n1,q,9,0,CH,a,b,c,d,e\n")
    with pytest.raises(DataError, match=r"bad.csv: line 2: field 'answer': expected an option index 0-4, got '9'"):
        read_nextqa(str(bad), str(tmp_path))
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"video_name": "x", "question_id": "a", "question": "is it"}]))
    with pytest.raises(DataError, match="give the answer file with --answers"):
        read_activitynet(str(q), str(tmp_path))
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"PororoQA": [{"qid": 0, "question": "q", "video_name": "a_b"}]}))
    with pytest.raises(DataError, match=r"p.json: item 0: missing field 'correct_idx'"):
        read_pororoqa(str(p), str(tmp_path))


def test_scoring():
    assert score("nextqa", "<think>x</think><answer> 2 </answer>", "2") == ("2", True)
    assert score("nextqa", "<answer>(2) a blue bar</answer>", "2") == ("(2) a blue bar", False)  # exact match
    assert score("nextqa", "<answer>2", "2") == (None, False)
    assert score("activitynet", "<ANSWER>Yes</ANSWER>", "yes") == ("yes", True)
    assert score("activitynet", "I think no, then yes.", "yes") == ("yes", True)  # the last yes/no word
    assert score("activitynet", "maybe", "no") == (None, False)


KNOWN = {"nextqa": {"1001_0": "<answer>2</answer>", "1003_0": "<answer>0</answer>"},
         "activitynet": {"v_abcDEF_0": "<vision>v</vision><answer>YES</answer>"},
         "pororoqa": {"0": "<answer>1</answer>", "1": "<answer> 3 </answer>"}}


@pytest.mark.parametrize("bench, annotations, extra, expect_qids, expect_frames", [
    ("nextqa", "nextqa/val.csv", {"video_map": "nextqa/map.json"}, ["1001_0", "1001_1", "1002_0", "1003_0"],
     {"1001_1": 32, "1002_0": 20}),  # 32 frames, or every frame of a shorter clip
    ("activitynet", "anet/test_q.json", {"answers": "anet/test_a.json"}, ["v_abcDEF_0", "v_ghi_jkl_0", "v_ghi_jkl_1"],
     {"v_ghi_jkl_0": 32}),
    ("pororoqa", "pororo/qa_subset.json", {}, ["0", "1", "2"], {"2": 4}),
])
def test_videoqa_end_to_end(benches, tiny_cfg, policy_path, tmp_path, bench, annotations, extra, expect_qids,
                            expect_frames):
    d = benches
    root = {"nextqa": "nextqa", "activitynet": "anet", "pororoqa": "pororo"}[bench]
    out = tmp_path / bench
    out.mkdir()
    gold = {}
    # a resumed run: some questions were answered before, with known outputs
    with open(out / "predictions.jsonl", "w") as f:
        for qid, raw in KNOWN[bench].items():
            g = {"1001_0": "2", "1003_0": "1", "v_abcDEF_0": "yes", "0": "1", "1": "3"}[qid]
            pred, ok = my_score(bench, raw, g)
            typ = {"1001_0": "CH", "1003_0": "CH", "v_abcDEF_0": "3"}.get(qid)
            f.write(json.dumps({"qid": qid, "pred": pred, "answer": g, "correct": ok, "type": typ,
                                "raw_output": raw}) + "\n")
    kwargs = {k: str(d / v) for k, v in extra.items()}
    res = run_videoqa(tiny_cfg(), bench=bench, annotations=str(d / annotations), video_root=str(d / root),
                      out_dir=str(out), model_path=policy_path, max_new_tokens=6, progress=False, **kwargs)
    rows = read_jsonl(str(out / "predictions.jsonl"))
    assert sorted(r["qid"] for r in rows) == sorted(expect_qids)
    for r in rows:
        gold[r["qid"]] = r["answer"]
        assert (r["pred"], r["correct"]) == my_score(bench, r["raw_output"], r["answer"]), r["qid"]
        if r["qid"] in expect_frames:
            assert r["frames"] == expect_frames[r["qid"]]
    # recomputed from predictions.jsonl: the numbers of metrics.json
    saved = json.load(open(out / "metrics.json"))
    assert saved == json.loads(json.dumps(res))
    correct = [r["correct"] for r in rows]
    assert saved["n"] == len(rows) and saved["correct"] == sum(correct) > 0
    assert saved["accuracy"] == pytest.approx(sum(correct) / len(rows))
    by_type = {}
    for r in rows:
        if r["type"] is not None:
            by_type.setdefault(r["type"], []).append(r["correct"])
    assert {t: (v["correct"], v["n"]) for t, v in saved["by_type"].items()} == \
        {t: (sum(v), len(v)) for t, v in by_type.items()}
    assert saved["ci95"][0] <= saved["accuracy"] <= saved["ci95"][1]
    if bench == "nextqa":  # 1004's clip does not exist: skipped and recorded, not counted
        assert res["skipped"] == 1
        assert "1004.mp4" in read_jsonl(str(out / "skipped.jsonl"))[0]["file"]
        assert saved["by_type"]["CH"]["n"] == 2 and "TC" not in saved["by_type"]
    if bench == "pororoqa":
        assert saved["by_type"] == {}
    assert videoqa_metrics(rows)["by_type"] == saved["by_type"]
