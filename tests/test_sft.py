"""The CoT-SFT stage: the loss is the assistant turn's NLL only; `fastebm sft` then `fastebm train` from its
checkpoint run end to end on the CPU with all four rewards in metrics.jsonl at every step."""
import os
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
