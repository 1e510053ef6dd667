"""fastebm report: a PNG for every reward, the total, KL, loss, completion length and per-phase step time
from a real metrics.jsonl schema, and the evaluation results found under the run as tables, in one
static HTML page."""
import json
import os
import re
import subprocess
import sys

from PIL import Image

from fastebm.eval.judge import pairwise_stats
from fastebm.eval.report import find_eval_results, write_report
from fastebm.eval.videoqa import videoqa_metrics
from fastebm.train.metrics import MetricsWriter, step_metrics

from evalpaths import ROOT

REWARDS = ["format", "accuracy", "clip", "pcg"]


def write_run(run):
    run.mkdir()
    w = MetricsWriter(str(run))
    for step in range(1, 6):
        rewards = {n: [0.1 * step + i * 0.01 + k for i in range(4)] for k, n in enumerate(REWARDS)}
        m = step_metrics(step, rewards=rewards, weights={n: 1.0 for n in REWARDS}, group_size=2, reward_errors={},
                         advantages=[0.1, -0.1, 0.2, -0.2], lengths=[10 + step, 12, 9, 11], truncated=[False] * 4,
                         prefix_tokens=400,
                         update={"loss": 1.0 / step, "kl": 0.01 * step, "lr": 1e-6, "grad_norm": 0.5},
                         times={"time/rollout_s": 1.0, "time/score_s": 0.5, "time/update_s": 0.7, "time/step_s": 2.3},
                         samples_skipped=0, profiles_missing=0)
        if step == 3:
            m["loss"] = float("nan")  # written as null
        w.write(m)
    w.close()
    ev = run / "eval"
    (ev / "vqa").mkdir(parents=True)
    rows = [{"correct": c, "type": t, "pred": "1"} for c, t in [(True, "CH"), (False, "CH"), (True, "TN")]]
    (ev / "vqa" / "metrics.json").write_text(json.dumps({"bench": "nextqa", **videoqa_metrics(rows)}))
    (ev / "pw").mkdir()
    (ev / "pw" / "pairwise.json").write_text(json.dumps({
        "protocol": "pairwise", "anchor": {"name": "ebm"}, "opponent": {"name": "base"}, "samples": 9,
        "metrics": {"VEG": pairwise_stats(["anchor"] * 6 + ["opponent"] * 2 + ["tie"])}}))
    (ev / "judge.json").write_text(json.dumps({
        "protocol": "absolute", "metrics": ["VEG"],
        "models": {"ebm": {"VEG": {"mean": 74.25, "ci95": [70.0, 78.5], "n": 9}, "samples": 9, "failed": 0}}}))
    (ev / "metrics.json").write_text(json.dumps({
        "overall": {"n": 4, "format": 4.5, "accuracy": 0.61},
        "by_data_source": {"Harry Potter": {"n": 4, "format": 4.5, "accuracy": 0.61}}}))
    (ev / "unrelated.json").write_text("{}")


def test_report(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    index = write_report(str(run))
    assert index == str(run / "report" / "index.html")
    page = open(index).read()
    expected = [f"reward_{n}.png" for n in REWARDS] + ["reward_total.png", "kl.png", "loss.png",
                                                        "completion_mean_len.png", "time.png", "lr.png",
                                                        "grad_norm.png"]
    for name in expected:
        path = run / "report" / name
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
        assert f"src='{name}'" in page
    assert sorted(re.findall(r"src='([^']+)'", page)) == sorted(expected)
    # the evaluation results, as tables
    assert len(find_eval_results(str(run))) == 4
    for text in ("eval/vqa/metrics.json", "eval/pw/pairwise.json", "eval/judge.json", "eval/metrics.json",
                 "74.25", "[70, 78.5]", "Harry Potter", "0.6667", ">6<", ">2<", "anchor <b>ebm</b>"):
        assert text in page, text
    assert "5 steps logged" in page


def test_report_cli_other_out_dir_and_no_metrics(tmp_path):
    run = tmp_path / "empty_run"
    run.mkdir()
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "report", str(run), "--out", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "report: " + str(tmp_path / "r" / "index.html") in res.stdout
    assert "No metrics.jsonl" in open(tmp_path / "r" / "index.html").read()
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "report", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "run directory not found" in res.stderr
    assert not os.path.exists(tmp_path / "nope")
