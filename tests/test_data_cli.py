"""`fastebm data sample` and `fastebm data check` through the real command line."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastebm.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_sample_then_check(tmp_path):
    out = tmp_path / "sample"
    res = run("data", "sample", str(out))
    assert res.returncode == 0, res.stderr
    recs = json.load(open(out / "train.json"))
    cot = json.load(open(out / "cot.json"))
    assert len(recs) >= 24 and all("process" in r for r in cot) and not any("process" in r for r in recs)
    exts = {os.path.splitext(r["video_path"])[1] for r in recs}
    assert exts == {".mp4", ".webm"}  # H.264 and VP9
    profiles = json.load(open(out / "profiles.json"))
    assert set(profiles) == {recs[0]["data_source"]}

    ok = run("data", "check", str(out / "train.json"))
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert f"{len(recs)} records: {len(recs)} valid; {len(recs)} videos decoded; 0 problems" in ok.stdout

    # break one video and one record: non-zero exit, each named
    bad_video = out / recs[5]["video_path"]
    bad_video.write_bytes(b"not a video at all")
    recs[7].pop("dialogue")
    (out / "broken.json").write_text(json.dumps(recs))
    bad = run("data", "check", str(out / "broken.json"), "--video-root", str(out))
    assert bad.returncode == 1
    text = " ".join(bad.stdout.split())
    assert os.path.basename(str(bad_video)) in text and "missing field 'dialogue'" in text and "2 problems" in text
