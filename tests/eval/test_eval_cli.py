"""Every evaluation command end to end through the CLI, on the tiny recipe and the bundled sample data:
generate (two prompt modes), eval auto, eval judge and pairwise against an OpenAI-compatible server on
127.0.0.1 (with a 429 and a malformed reply; the key never printed or written), eval judge with
--judge-local, eval videoqa, and report over the results."""
import json
import os
import re
import subprocess
import sys

import pytest

from fastebm.data.synth import write_synthetic_clip
from fastebm.eval.judge import CRITERIA
from fastebm.eval.generate import read_jsonl

from evalpaths import ROOT, TINY
from judge_server import JudgeServer, text_of

pytestmark = pytest.mark.slow
KEY = "sk-cli-SECRET-42"


def run(args, env=None, timeout=600):
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})})
    return res


@pytest.fixture(scope="module")
def work(tmp_path_factory, model_dir):
    d = tmp_path_factory.mktemp("cli")
    sample = d / "sample"
    common = [f"model.tiny_cache_dir={model_dir}", f"data.sample_dir={sample}", "eval.max_new_tokens=8"]
    from fastebm.data.sample import write_sample_dataset

    paths = write_sample_dataset(str(sample))
    common.append(f"data.profiles={paths['profiles']}")
    return {"dir": d, "records": paths["train"], "common": common}


@pytest.fixture(scope="module")
def generated(work, policy_path):
    d, out = work["dir"], {}
    for mode in ("ebm", "vanilla"):
        path = str(d / "preds" / f"{mode}.jsonl")
        res = run(["generate", TINY, "--records", work["records"], "--out", path, "--prompt-mode", mode, "--limit",
                   "3", "--checkpoint", policy_path, "--no-progress", *work["common"]])
        assert res.returncode == 0, res.stderr[-3000:]
        assert "generated 3 (0 already in" in res.stdout
        out[mode] = path
    return out


def test_generate(generated):
    rows = read_jsonl(generated["ebm"])
    assert len(rows) == 3 and all(r["prompt_mode"] == "ebm" and r["completion_tokens"] <= 8 for r in rows)
    assert {r["prompt_mode"] for r in read_jsonl(generated["vanilla"])} == {"vanilla"}


def test_eval_auto(generated, work):
    out = work["dir"] / "auto"
    res = run(["eval", "auto", generated["ebm"], "--recipe", TINY, "--out", str(out), "--no-progress",
               *work["common"]])
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.load(open(out / "metrics.json"))
    assert m["overall"]["n"] == 3 and set(m["rewards"]) == {"accuracy", "clip", "pcg"}
    assert "| overall | 3 |" in res.stdout and "The Lantern Coast" in res.stdout


def absolute(body, n):
    if n == 1:
        return "Sorry, I cannot score these."  # malformed once: asked again
    labels = re.findall(r"^Response ([A-Z]):", text_of(body), re.M)
    return json.dumps({lab: {m: {k: 60 + i for k in subs} for m, subs in CRITERIA.items()}
                       for i, lab in enumerate(labels)})


def test_eval_judge_with_a_server_never_leaks_the_key(generated, work):
    out = work["dir"] / "judge"
    with JudgeServer(absolute, fail=[429]) as s:
        res = run(["eval", "judge", generated["ebm"], f"plain={generated['vanilla']}", "--out", str(out),
                   "--judge-url", s.url, "--judge-model", "judge-x", "--samples", "2", "--no-progress"],
                  env={"FASTEBM_JUDGE_API_KEY": KEY})
    assert res.returncode == 0, res.stderr[-3000:]
    j = json.load(open(out / "judge.json"))
    assert j["samples"] == 2 and set(j["models"]) == {"ebm", "plain"}
    assert j["requests"]["http_retries"] == 1 and j["requests"]["reasks"] >= 1 and j["requests"]["failures"] == 0
    assert j["judge"] == {"kind": "openai", "url": s.url, "model": "judge-x"}
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in s.requests)
    assert "ebm: VEG" in res.stdout
    assert KEY not in res.stdout + res.stderr
    for d, _, files in os.walk(work["dir"]):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                assert KEY.encode() not in fh.read(), os.path.join(d, f)


def test_eval_pairwise_always_first_gives_ties(generated, work):
    out = work["dir"] / "pairwise"
    with JudgeServer(lambda b, n: '{"VEG": "A", "CN": "A", "SPC": "A"}') as s:
        res = run(["eval", "pairwise", generated["ebm"], generated["vanilla"], "--out", str(out), "--judge-url",
                   s.url, "--judge-model", "judge-x", "--samples", "3", "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    p = json.load(open(out / "pairwise.json"))
    decided = sum(1 for d in read_jsonl(str(out / "pairwise_samples.jsonl")) if d.get("without_judge"))
    for m in ("VEG", "CN", "SPC"):
        assert p["metrics"][m]["tie"] == 3 - decided and p["metrics"][m]["errors"] == 0
    # two requests per judged sample (identical lines make identical requests: the second is a cache hit)
    assert p["requests"]["requests"] + p["requests"]["cache_hits"] == 2 * (3 - decided)
    assert len(s.requests) == p["requests"]["requests"]
    assert "VEG: win" in res.stdout


def test_eval_judge_local(generated, work, policy_path):
    out = work["dir"] / "judge_local"
    res = run(["eval", "judge", generated["ebm"], generated["vanilla"], "--out", str(out), "--judge-local",
               policy_path, "--max-tokens", "6", "--max-reasks", "1", "--samples", "2", "--device", "cpu",
               "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    j = json.load(open(out / "judge.json"))
    failed = sum(m["failed"] for m in j["models"].values())
    scored = sum(m["VEG"]["n"] for m in j["models"].values())
    assert failed + scored == 2 * 2 and j["requests"]["failures"] == failed  # an empty answer is scored 0
    assert j["judge"]["kind"] == "local"


def test_eval_videoqa(work, policy_path):
    d = work["dir"] / "anet"
    write_synthetic_clip(str(d / "v_clipA.mp4"), codec="h264", width=96, height=72, num_frames=30, fps=10)
    (d / "test_q.json").write_text(json.dumps([
        {"video_name": "clipA", "question_id": "v_clipA_0", "question": "is it moving"},
        {"video_name": "clipA", "question_id": "v_clipA_1", "question": "what is it"}]))
    (d / "test_a.json").write_text(json.dumps([{"question_id": "v_clipA_0", "answer": "yes", "type": 3},
                                               {"question_id": "v_clipA_1", "answer": "a box", "type": 5}]))
    out = work["dir"] / "videoqa"
    res = run(["eval", "videoqa", TINY, "--bench", "activitynet", "--annotations", str(d / "test_q.json"),
               "--video-root", str(d), "--out", str(out), "--checkpoint", policy_path, "--max-new-tokens", "4",
               "--no-progress", *work["common"]])
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.load(open(out / "metrics.json"))
    rows = read_jsonl(str(out / "predictions.jsonl"))
    assert m["n"] == len(rows) == 1 and rows[0]["frames"] == 30 and m["correct"] == int(rows[0]["correct"])
    assert "activitynet: accuracy" in res.stdout


def test_report_finds_the_evaluations(work):
    """After the commands above (this module runs in order): their results, as tables."""
    res = run(["report", str(work["dir"])])
    assert res.returncode == 0, res.stderr[-3000:]
    page = open(work["dir"] / "report" / "index.html").read()
    for f in ("auto/metrics.json", "judge/judge.json", "pairwise/pairwise.json", "videoqa/metrics.json"):
        assert f in page, f
