"""The CoT-SFT stage: the loss is the assistant turn's NLL only; a resumed run continues exactly; Ctrl-C
finishes the step, saves and stops (a second one stops at once); `fastebm sft` then `fastebm train` from
its checkpoint run end to end on the CPU with all four rewards in metrics.jsonl at every step. Several
ranks: tests/distributed/test_sft_distributed.py."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from fastebm.config import load_config
from fastebm.data.prompts import sft_target
from fastebm.train.metrics import read_metrics
from fastebm.train.sft import SFTTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "recipes", "tiny_sft.toml")
TINY = os.path.join(ROOT, "recipes", "tiny.toml")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("sft")
    return {"models": str(base / "models"), "data": str(base / "sample")}


def test_loss_is_the_assistant_turn_only(env, tmp_path):
    cfg = load_config(SFT, [f"run.output_dir={tmp_path / 'run'}", f"model.tiny_cache_dir={env['models']}",
                            f"data.sample_dir={env['data']}", "train.steps=1", "train.prompts_per_step=2",
                            "train.micro_batch_size=1"])
    t = SFTTrainer(cfg)
    state = t.sampler.state()
    prompts, targets = t.next_batch()
    tok, m = t.policy.tokenizer, t.policy.model
    rec = t.records[t.sampler._perm[0]]
    assert tok.decode(targets[0], skip_special_tokens=False) == sft_target(rec) + "<|im_end|>"
    # expected: token-mean NLL of the targets from plain full-logits forwards, prompts (video) excluded
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, tgt in zip(prompts, targets):
            ids = torch.tensor([p.ids + tgt])
            logits = m(input_ids=ids, attention_mask=torch.ones_like(ids),
                       pixel_values_videos=p.video.pixel_values_videos, video_grid_thw=p.video.video_grid_thw,
                       mm_token_type_ids=(ids == m.config.video_token_id).to(torch.int32) * 2).logits[0]
            lp = torch.log_softmax(logits[len(p.ids) - 1:-1].double(), -1)
            nll -= float(lp[torch.arange(len(tgt)), torch.tensor(tgt)].sum())
            n += len(tgt)
    t.sampler.load_state(state)  # the step sees the same two records
    step = t.train_step()
    assert step["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert step["tokens/target"] == n


def cfg_for(env, out, *overrides):
    return load_config(SFT, [f"run.output_dir={out}", f"model.tiny_cache_dir={env['models']}",
                             f"data.sample_dir={env['data']}", "log.progress=false", "train.prompts_per_step=2",
                             "train.micro_batch_size=1", *overrides])


def strip_times(m):
    return {k: v for k, v in m.items() if not k.startswith("time/")}


def test_resume_gives_identical_metrics(env, tmp_path):
    """A run resumed from its step-2 checkpoint gives the uninterrupted run's steps 3 and 4 and weights."""
    a = tmp_path / "a"
    full = SFTTrainer(cfg_for(env, a, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0")).train()
    assert [m["step"] for m in full] == [1, 2, 3, 4]
    b = tmp_path / "b"
    os.makedirs(b / "checkpoints")
    shutil.copytree(a / "checkpoints" / "2", b / "checkpoints" / "2")
    t = SFTTrainer(cfg_for(env, b, "train.steps=4", "train.resume=true"))
    assert t.step == 2
    resumed = t.train()
    assert [m["step"] for m in resumed] == [3, 4]
    for x, y in zip(full[2:], resumed):
        assert strip_times(x) == strip_times(y)
    assert full[3]["loss"] != full[2]["loss"]  # not vacuous: the steps differ
    from safetensors.torch import load_file

    sa = load_file(str(a / "checkpoints" / "4" / "model.safetensors"))
    sb = load_file(str(b / "checkpoints" / "4" / "model.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert os.path.realpath(b / "final") == os.path.realpath(b / "checkpoints" / "4")


class _NotHandled(Exception):
    pass


def _sigint_during_step(t, at_step, times):
    """Wrap t.train_step: after step ``at_step`` is computed, Ctrl-C ``times`` times (the process's own SIGINT)."""
    orig = t.train_step

    def step():
        m = orig()
        if t.step == at_step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return m

    t.train_step = step


@pytest.fixture
def sigint_guard():
    """While a test runs, a SIGINT that the training loop does not take raises _NotHandled (not a
    KeyboardInterrupt that would stop pytest); the loop must put this handler back when it ends."""
    def not_handled(signum, frame):
        raise _NotHandled("SIGINT reached the test's handler: the training loop did not install its own")

    prev = signal.signal(signal.SIGINT, not_handled)
    yield not_handled
    signal.signal(signal.SIGINT, prev)


def test_ctrl_c_finishes_the_step_saves_and_stops(env, tmp_path, sigint_guard):
    out = tmp_path / "run"
    t = SFTTrainer(cfg_for(env, out, "train.steps=10", "train.checkpoint_every=0"))
    _sigint_during_step(t, at_step=2, times=1)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2]
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]  # the step finished, then saved
    assert not os.path.exists(out / "final")  # an interrupted run is not the SFT stage's result
    assert signal.getsignal(signal.SIGINT) is sigint_guard
    resumed = SFTTrainer(cfg_for(env, out, "train.steps=3", "train.resume=true"))
    assert resumed.step == 2
    resumed.close()


def test_second_ctrl_c_stops_at_once(env, tmp_path, sigint_guard):
    out = tmp_path / "run"
    t = SFTTrainer(cfg_for(env, out, "train.steps=10", "train.checkpoint_every=0"))
    _sigint_during_step(t, at_step=2, times=2)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2]
    assert not os.path.exists(out / "checkpoints")  # stopped inside step 2's wrapper: nothing saved
    assert signal.getsignal(signal.SIGINT) is sigint_guard


@pytest.mark.slow
def test_sft_then_train_end_to_end(env, tmp_path):
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rl"
    common = [f"model.tiny_cache_dir={env['models']}", f"data.sample_dir={env['data']}"]
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "sft", SFT, "train.steps=3",
                          f"run.output_dir={sft_dir}", *common], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(str(sft_dir))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] < rows[0]["loss"]
    final = sft_dir / "final"
    assert os.path.isfile(final / "model.safetensors")
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "train", TINY, "train.steps=2", "model.tiny=",
                          f"model.path={final}", f"run.output_dir={rl_dir}", "log.progress=false", *common],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_config(str(rl_dir / "config.toml")).rewards.enabled == ["format", "accuracy", "clip", "pcg"]
    rows = read_metrics(str(rl_dir))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for name in ("format", "accuracy", "clip", "pcg"):
            assert f"reward/{name}" in r and f"reward/{name}_std" in r, name
            assert r[f"reward/{name}_errors"] == 0
