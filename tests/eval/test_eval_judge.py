"""The judge protocols against a real OpenAI-compatible server on 127.0.0.1 answering per the reply
contracts: absolute scores (8 frames <= 512 px, anonymised responses, empty answers 0 unasked, labels
re-asked, bootstrap intervals), pairwise with swapped positions (a judge that always prefers the first
position gives ties, not wins; p-value = scipy's), bounded concurrency, skipped clips."""
import base64
import io
import json
import os
import re

import pytest
from PIL import Image
from scipy.stats import binomtest

from fastebm.data.synth import write_synthetic_clip
from fastebm.eval.extract import parse_output
from fastebm.eval.generate import read_jsonl
from fastebm.eval.judge import (CRITERIA, METRICS, combine_verdicts, judge_absolute, judge_pairwise, load_model_preds,
                                pairwise_stats)
from fastebm.eval.judge_client import Asker, JudgeCache, OpenAIJudge
from fastebm.eval.stats import bootstrap_ci

from judge_server import JudgeServer, images_of, text_of

ALPHA = ["Stay close.", "Light the lamp now, quickly.", "We wait.", "Run!"]
BETA = ["I see it, and I do not like it at all.", "", "Nobody climbs the tower.", "The tide is turning."]
GAMMA = ["I see it, and I do not like it.", "Keep your voice down.", "Nobody climbs the tower.", "The tide."]


@pytest.fixture(scope="module")
def files(preds, tmp_path_factory):
    d = tmp_path_factory.mktemp("judge")
    rows = read_jsonl(preds)
    big = write_synthetic_clip(str(d / "big.mp4"), codec="h264", width=800, height=600, num_frames=12, fps=6)
    rows[2]["video"] = big  # frames must come out at 512 px on the longer side
    out = {}
    for name, answers in (("alpha", ALPHA), ("beta", BETA), ("gamma", GAMMA)):
        path = d / f"{name}.jsonl"
        lines = []
        for r, a in zip(rows, answers):
            text = f"<vision>a scene</vision><think>I react</think><answer>{a}</answer>"
            lines.append(json.dumps(dict(r, raw_output=text, **parse_output(text))))
        path.write_text("\n".join(lines) + "\n")
        out[name] = str(path)
    missing = d / "missing_video.jsonl"  # one more file whose second sample's clip is gone
    lines = [json.loads(x) for x in open(out["alpha"])]
    lines[1]["video"] = str(d / "gone.mp4")
    missing.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out["alpha_missing_video"] = str(missing)
    return out


def shown_responses(body):
    """{label: answer} of an absolute request, read from its text."""
    t = text_of(body)
    return dict(re.findall(r"^Response ([A-Z]):\n(.*?)(?=\n\nResponse [A-Z]:|\n\nScore every)", t, re.M | re.S))


def words(a):
    return len(a.split())


def absolute_reply(body, n):
    """Every sub-score 10 x the answer's words (capped at 100); the first reply forgets label A."""
    resp = shown_responses(body)
    out = {lab: {m: {k: min(100, 10 * words(a)) for k in subs} for m, subs in CRITERIA.items()}
           for lab, a in resp.items()}
    if n == 0:
        out.pop("A")
    return json.dumps(out)


def asker(server, tmp_path, name="cache"):
    return Asker(OpenAIJudge(server.url, "judge", backoff_s=0.001), JudgeCache(str(tmp_path / name)))


def test_absolute_protocol(files, tmp_path):
    models = load_model_preds([files["alpha"], f"b={files['beta']}"])
    with JudgeServer(absolute_reply, delay=0.05) as s:
        a = asker(s, tmp_path)
        res = judge_absolute(models, a, str(tmp_path / "out"), samples=0, seed=3, concurrency=2, progress=False)
    assert res["samples"] == 4 and not res["skipped"]
    # one request per sample, plus the re-ask for the label the first reply forgot
    assert res["requests"]["requests"] == 5 and res["requests"]["reasks"] == 1 and res["requests"]["failures"] == 0
    assert 1 <= s.max_in_flight <= 2  # --concurrency bounds the requests in flight
    samples = read_jsonl(str(tmp_path / "out" / "judge_samples.jsonl"))
    for i, (name, answers) in enumerate((("alpha", ALPHA), ("b", BETA))):
        expected = [min(100, 10 * words(x)) if x else 0.0 for x in answers]
        for m in METRICS:
            got = res["models"][name][m]
            assert got["n"] == 4 and got["mean"] == pytest.approx(sum(expected) / 4)
            in_order = [d["scores"][name][m] for d in samples]
            assert sorted(in_order) == pytest.approx(sorted(expected))
            assert got["ci95"] == bootstrap_ci(in_order, seed=3 + i)
            assert got["ci95"][0] <= got["mean"] <= got["ci95"][1]
    assert res["models"]["b"]["empty"] == 1 and res["models"]["alpha"]["empty"] == 0
    details = {d["id"]: d for d in samples}
    empty_id = read_jsonl(files["beta"])[1]["id"]
    assert details[empty_id]["labels"] == {"A": "alpha"}  # the empty answer was not shown
    for r in s.requests:
        body = r["body"]
        text = text_of(body)
        assert "alpha" not in text and "beta" not in text and '"b"' not in text  # anonymised
        imgs = images_of(body)
        assert len(imgs) == 8
        sizes = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in imgs]
        assert all(max(sz) <= 512 for sz in sizes)
    sizes = {Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size
             for r in s.requests for u in images_of(r["body"])}
    assert (512, 384) in sizes and (160, 120) in sizes  # the 800x600 clip scaled down, the others kept
    # a rerun asks nothing: every reply comes from the cache
    with JudgeServer(absolute_reply) as s2:
        again = judge_absolute(models, asker(s2, tmp_path), str(tmp_path / "out2"), samples=0, seed=3,
                               progress=False)
    assert len(s2.requests) == 0 and again["requests"]["cache_hits"] == 5
    assert again["models"] == res["models"]


def test_absolute_failures_are_counted_and_left_out(files, tmp_path):
    models = load_model_preds([files["alpha"], files["gamma"]])
    with JudgeServer(lambda b, n: "no idea") as s:
        res = judge_absolute(models, asker(s, tmp_path), str(tmp_path / "o"), samples=2, progress=False)
    assert res["requests"]["requests"] == 2 * 3 and res["requests"]["failures"] == 2 * 2
    for m in ("alpha", "gamma"):
        assert res["models"][m]["failed"] == 2 and res["models"][m]["VEG"]["n"] == 0
        assert res["models"][m]["VEG"]["mean"] is None


def test_a_sample_without_its_clip_is_skipped(files, tmp_path):
    models = load_model_preds([files["alpha_missing_video"], files["gamma"]])
    with JudgeServer(absolute_reply) as s:
        res = judge_absolute(models, asker(s, tmp_path), str(tmp_path / "o"), samples=0, progress=False)
    gone = read_jsonl(files["alpha_missing_video"])[1]["id"]
    assert [x["id"] for x in res["skipped"]] == [gone] and "file not found" in res["skipped"][0]["reason"]
    assert res["samples"] == 3 and res["models"]["gamma"]["VEG"]["n"] == 3


def pair(body):
    t = text_of(body)
    m = re.search(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\nDecide", t, re.S)
    return m.group(1), m.group(2)


def test_a_judge_that_always_prefers_position_a_gives_ties(files, tmp_path):
    a, g = load_model_preds([files["alpha"], files["gamma"]])
    with JudgeServer(lambda b, n: '{"VEG": "A", "CN": "A", "SPC": "A"}') as s:
        res = judge_pairwise(a, g, asker(s, tmp_path), str(tmp_path / "o"), samples=0, progress=False)
    assert len(s.requests) == 8  # two per sample: the anchor first, then the opponent first
    firsts = [pair(r["body"])[0] for r in s.requests]
    assert sorted(firsts) == sorted(ALPHA + GAMMA)
    for m in METRICS:
        st = res["metrics"][m]
        assert (st["win"], st["loss"], st["tie"], st["errors"]) == (0, 0, 4, 0)
        assert st["p_value"] is None and st["decisive_win_rate"] is None and st["net_win_rate"] == 0
    assert res["agreement"] == {"consistent": 0, "tie_and_win": 0, "contradictory": 12}


def content_judge(body, n):
    """VEG: the longer line; CN: the shorter one; SPC: a tie when equally long, else the longer."""
    ra, rb = pair(body)
    la, lb = len(ra), len(rb)
    longer, shorter = ("A", "B") if la > lb else ("B", "A")
    return json.dumps({"VEG": longer, "CN": shorter, "SPC": "tie" if words(ra) == words(rb) else longer})


def test_pairwise_protocol_and_p_value(files, tmp_path):
    a, b = load_model_preds([files["alpha"], files["beta"]])
    with JudgeServer(content_judge) as s:
        res = judge_pairwise(a, b, asker(s, tmp_path), str(tmp_path / "o"), samples=0, progress=False)
    assert len(s.requests) == 6  # beta's empty answer: decided without the judge
    exp = {m: [] for m in METRICS}
    for x, y in zip(ALPHA, BETA):
        if not y:
            for m in METRICS:
                exp[m].append("anchor")
            continue
        exp["VEG"].append("anchor" if len(x) > len(y) else "opponent")
        exp["CN"].append("anchor" if len(x) < len(y) else "opponent")
        exp["SPC"].append("tie" if words(x) == words(y) else "anchor" if len(x) > len(y) else "opponent")
    for m in METRICS:
        st = res["metrics"][m]
        assert (st["win"], st["loss"], st["tie"]) == tuple(exp[m].count(k) for k in ("anchor", "opponent", "tie"))
        n = st["win"] + st["loss"]
        assert st["p_value"] == pytest.approx(binomtest(st["win"], n, 0.5).pvalue if n else None)
        assert st["net_win_rate"] == pytest.approx((st["win"] - st["loss"]) / 4)
    assert res["agreement"]["consistent"] == 9 and res["agreement"]["contradictory"] == 0
    saved = json.load(open(tmp_path / "o" / "pairwise.json"))
    assert saved["metrics"] == res["metrics"] and saved["anchor"]["name"] == "alpha"


def release_p_value(wins, losses):
    """The exact two-sided binomial test written out: the probability of every outcome no more likely than the
    observed one (what the release computes by hand)."""
    from math import comb

    n = wins + losses
    obs = comb(n, wins) / 2 ** n
    return min(1.0, sum(comb(n, k) / 2 ** n for k in range(n + 1) if comb(n, k) / 2 ** n <= obs * (1 + 1e-9)))


@pytest.mark.parametrize("win, loss, tie, err", [(30, 12, 8, 2), (5, 5, 0, 0), (0, 7, 3, 0), (1, 0, 0, 0)])
def test_pairwise_stats_and_p_value_equal_scipy(win, loss, tie, err):
    st = pairwise_stats(["anchor"] * win + ["opponent"] * loss + ["tie"] * tie + [None] * err)
    assert (st["win"], st["loss"], st["tie"], st["errors"], st["n"]) == (win, loss, tie, err, win + loss + tie)
    assert st["p_value"] == binomtest(win, win + loss, 0.5, alternative="two-sided").pvalue
    assert st["p_value"] == pytest.approx(release_p_value(win, loss), rel=1e-9)
    assert st["decisive_win_rate"] == win / (win + loss)
    assert st["win_rate"] == win / (win + loss + tie) and st["tie_rate"] == tie / (win + loss + tie)


@pytest.mark.parametrize("first, second, combined", [
    ("anchor", "anchor", "anchor"), ("opponent", "opponent", "opponent"), ("tie", "tie", "tie"),
    ("tie", "anchor", "anchor"), ("opponent", "tie", "opponent"), ("anchor", "opponent", "tie"),
    ("opponent", "anchor", "tie")])
def test_combine_verdicts(first, second, combined):
    assert combine_verdicts(first, second) == combined


def test_model_names(files):
    models = load_model_preds([files["alpha"], f"mine={files['beta']}"])
    assert [m.name for m in models] == ["alpha", "mine"] and len(models[1].rows) == 4
    with pytest.raises(Exception, match="used twice"):
        load_model_preds([files["alpha"], files["alpha"]])
    assert os.path.basename(models[0].path) == "alpha.jsonl"


def test_the_cli_needs_exactly_one_judge(tmp_path):
    import subprocess
    import sys

    from evalpaths import ROOT

    for extra in ([], ["--judge-url", "http://127.0.0.1:9/v1"], ["--judge-local", "m", "--judge-url", "u",
                                                                  "--judge-model", "x"]):
        res = subprocess.run([sys.executable, "-m", "fastebm.cli", "eval", "judge", "p.jsonl", "--out",
                              str(tmp_path), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "give --judge-url and --judge-model" in res.stderr, extra
