"""A reward written outside fastebm, registered through the public API and imported with
``rewards.plugins``, that uses the teacher protocol: it trains in a tiny run through the real CLI,
its sequences ride along in the trainer's reference pass (one forward per prompt), and the values
equal the reward scoring its requests on its own."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "recipes", "tiny.toml")

PLUGIN = textwrap.dedent('''
    """A reward outside fastebm: the frozen teacher's mean log-prob of each completion's <answer> text
    right after the prompt, through the teacher protocol."""
    from fastebm.rewards import TeacherRequest, extract_tag, register, score_requests


    class AnswerLikelihood:
        def __init__(self, context):
            self.teacher = context.reference
            self.answer_tag = context.tags[2]

        def _ids(self, text):
            tok = self.teacher.tokenizer
            return tok(text, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]

        def teacher_requests(self, completions, inputs):
            G = inputs.group_size
            return [TeacherRequest(p, [self._ids(extract_tag(completions[i], self.answer_tag) or completions[i])
                                       for i in range(p * G, (p + 1) * G)], meta=list(range(p * G, (p + 1) * G)))
                    for p in range(len(inputs.records))]

        def score_with_teacher(self, completions, inputs, requests, logprobs):
            out = [0.0] * len(completions)
            for req, lps in zip(requests, logprobs):
                for i, lp in zip(req.meta, lps):
                    out[i] = float(lp.double().mean())
            return out

        def __call__(self, completions, inputs):
            reqs = self.teacher_requests(completions, inputs)
            return self.score_with_teacher(completions, inputs, reqs, score_requests(self.teacher, inputs, reqs))


    @register("answer_likelihood", needs_teacher=True)
    def make_answer_likelihood(cfg, context):
        return AnswerLikelihood(context)
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugin")
    path = d / "answer_likelihood_reward.py"
    path.write_text(PLUGIN)
    return {"path": str(path), "models": str(d / "models"), "data": str(d / "sample")}


def overrides(plugin, out, *extra):
    return [f"run.output_dir={out}", f"model.tiny_cache_dir={plugin['models']}", f"data.sample_dir={plugin['data']}",
            "log.progress=false", f"rewards.plugins=['{plugin['path']}']",
            "rewards.enabled=['format','answer_likelihood']", "rewards.weights={format=1.0,answer_likelihood=0.5}",
            *extra]


def test_plugin_reward_rides_in_the_reference_pass(plugin, tmp_path):
    from fastebm.config import load_config
    from fastebm.model.rollout import RolloutResult
    from fastebm.train.trainer import Trainer

    # beta = 0: no KL pass, but the reward declared needs_teacher, so the reference is loaded for it
    cfg = load_config(TINY, overrides(plugin, tmp_path / "run", "rollout.group_size=3", "grpo.beta=0"))
    t = Trainer(cfg)
    assert t.reference is not None
    batch = t.next_batch()
    tok = t.policy.tokenizer
    texts = ["<vision> a red shape </vision> <think> waiting </think> <answer> Stay here. </answer>",
             "no tags at all", "<answer> Run. </answer>"] * 2
    comps = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in texts]
    roll = RolloutResult(comps, [0, 0, 0, 1, 1, 1], texts, [False] * 6, 0)
    inner, calls = t.reference.model.model, []
    orig = inner.forward
    inner.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    scored = t.score_step(batch, roll)
    inner.forward = orig
    alone = t.rewards["answer_likelihood"](texts, t.reward_inputs(batch, roll))
    t.close()
    assert len(calls) == 2                       # one reference forward per prompt
    assert scored.ref_logps is None              # beta = 0: no KL target
    got = scored.rewards["answer_likelihood"]
    assert scored.reward_errors["answer_likelihood"] == 0
    assert all(v < 0 for v in got) and len(set(round(v, 6) for v in got)) > 2
    assert got == pytest.approx(alone, abs=1e-5)


@pytest.mark.slow
def test_plugin_reward_trains_through_the_cli(plugin, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastebm.cli", "train", TINY, *overrides(plugin, out, "train.steps=2")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if x.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reward/answer_likelihood_errors"] == 0
        assert r["reward/answer_likelihood"] < 0     # a mean log-prob under the teacher
        assert r["kl"] >= 0


def test_unknown_plugin_reward_fails_before_loading(plugin, tmp_path):
    cmd = [sys.executable, "-m", "fastebm.cli", "train", TINY, f"run.output_dir={tmp_path / 'r'}",
           "rewards.enabled=['format','nope']", "rewards.weights={format=1.0,nope=1.0}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown reward 'nope'" in res.stderr
    assert not os.path.exists(tmp_path / "r" / "checkpoints")
