"""--judge-local: a tiny random Qwen2-VL run in-process with the same messages, templates and contract.
Its replies are (almost always) not the contract's JSON: what is tested is that every invalid reply is
asked again up to the bound, then counted as a failure, and that the counts add up."""
import json

import pytest

from fastebm.eval.judge import METRICS, judge_absolute, judge_pairwise, load_model_preds
from fastebm.eval.judge_client import Asker, JudgeCache, LocalJudge


@pytest.fixture(scope="module")
def local_judge(policy_path):
    return LocalJudge(policy_path, device="cpu", max_new_tokens=8)


@pytest.fixture(scope="module")
def two_files(preds, tmp_path_factory):
    d = tmp_path_factory.mktemp("local")
    rows = [json.loads(x) for x in open(preds)][:2]
    out = []
    for name, ans in (("one", "Stay close."), ("two", "Light the lamp.")):
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps(dict(r, answer=ans)) + "\n" for r in rows))
        out.append(str(p))
    return out


@pytest.mark.slow
def test_local_judge_failure_accounting(local_judge, two_files, tmp_path):
    models = load_model_preds(two_files)
    asker = Asker(local_judge, JudgeCache(str(tmp_path / "cache")), max_reasks=1)
    res = judge_absolute(models, asker, str(tmp_path / "abs"), samples=0, progress=False)
    st = res["requests"]
    failed = sum(m["failed"] for m in res["models"].values())
    scored = sum(m["VEG"]["n"] for m in res["models"].values())
    assert failed + scored == 2 * 2                         # every (sample, model) is scored or a failure
    assert st["failures"] == failed > 0                      # the random model breaks the contract
    assert st["requests"] == 2 + st["reasks"] and st["reasks"] <= 2 and st["invalid_replies"] >= st["reasks"]
    assert all(m["VEG"]["mean"] is None or 0 <= m["VEG"]["mean"] <= 100 for m in res["models"].values())

    pw = judge_pairwise(models[0], models[1], asker, str(tmp_path / "pw"), samples=0, progress=False)
    for m in METRICS:
        s = pw["metrics"][m]
        assert s["win"] + s["loss"] + s["tie"] + s["errors"] == 2
    assert sum(pw["metrics"][m]["errors"] for m in METRICS) > 0
    assert asker.stats.requests + asker.stats.cache_hits >= st["requests"] + 2 * 2

    again = Asker(local_judge, JudgeCache(str(tmp_path / "cache")), max_reasks=1)
    res2 = judge_absolute(models, again, str(tmp_path / "abs2"), samples=0, progress=False)
    assert again.stats.requests == 0 and again.stats.cache_hits == st["requests"]   # cached, as a server's
    assert res2["models"] == res["models"]
