"""The trainers build prompts through the one prompt path: SFT and GRPO give a record the same prompt
ids with the same [prompt] templates, and `fastebm data show-prompt` prints exactly that chat;
data.max_prompt_tokens cuts the history of a long record and skips (with the reason) one that cannot
fit; a prompt past the model's positions is warned about; train.epochs sets the run's length and the
`epoch` metric."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from fastebm.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY, SFT = os.path.join(ROOT, "recipes", "tiny.toml"), os.path.join(ROOT, "recipes", "tiny_sft.toml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four sample CoT records with their clips; record 0 has a 40-turn dialogue, record 1's user a
    profile far longer than any prompt limit below."""
    from fastebm.data.sample import CHARACTERS, SOURCE, make_records
    from fastebm.data.synth import write_synthetic_clip

    d = tmp_path_factory.mktemp("prompt_path")
    recs = make_records(4 * 3)[::3]  # one record of each of the first four sessions
    recs[0]["dialogue"] = [{"speaker": recs[0]["user"] if i % 2 == 0 else recs[0]["assistant"],
                            "utterance": f"We keep talking about the tide, turn {i}."} for i in range(40)]
    for i, r in enumerate(recs):
        write_synthetic_clip(str(d / r["video_path"]), codec="vp9", width=96, height=72, num_frames=24, fps=8.0, seed=i)
    recs[1]["user"] = "The Stranger"  # nobody else's partner: only record 1 gets this profile
    for turn in recs[1]["dialogue"]:
        if turn["speaker"] not in (recs[1]["assistant"],):
            turn["speaker"] = "The Stranger"
    (d / "cot.json").write_text(json.dumps(recs))
    profiles = {SOURCE: dict(CHARACTERS)}
    profiles[SOURCE]["The Stranger"] = " ".join(["A very long profile sentence about the sea."] * 300)
    (d / "profiles.json").write_text(json.dumps(profiles))
    return d, recs


def overrides(d, tmp, *more):
    return [f"run.output_dir={tmp / 'run'}", f"model.tiny_cache_dir={d / 'models'}", f"data.train={d / 'cot.json'}",
            f"data.cot={d / 'cot.json'}", f"data.video_root={d}", f"data.profiles={d / 'profiles.json'}",
            "log.progress=false", "train.checkpoint_every=0", *more]


def test_long_prompts_are_cut_or_skipped_and_epochs_set_the_length(data, tmp_path, caplog):
    from fastebm.data.video import load_video_sample
    from fastebm.train.metrics import read_metrics
    from fastebm.train.trainer import Trainer

    d, recs = data
    cfg = load_config(TINY, overrides(d, tmp_path, "data.max_prompt_tokens=700", "train.epochs=1.0",
                                      "train.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4",
                                      "rewards.enabled=['format']", "rewards.weights={format=1.0}"))
    t = Trainer(cfg)
    assert t.total_steps == 2  # ceil(1 epoch x 4 records / 2 prompts per step)
    video = load_video_sample(str(d / recs[0]["video_path"]), cfg.video, **t._video_sample_kwargs)
    long = t.batches._prompt(t.records[0], video)
    assert len(long.ids) <= 700
    text = t.policy.tokenizer.decode(long.ids)
    assert "turn 39." in text and "turn 0." not in text  # the oldest turns went, the newest stayed
    with caplog.at_level(logging.WARNING, logger="fastebm"):
        t.batches.max_positions = 100  # as if the model had 100 positions: warned once per record
        t.batches._prompt(t.records[2], video)
        t.batches._prompt(t.records[2], video)
        t.batches.max_positions = 0
    warned = [r.getMessage() for r in caplog.records if "max_position_embeddings = 100" in r.getMessage()]
    assert len(warned) == 1 and "record 2" in warned[0]
    hist = t.train()
    assert [m["step"] for m in hist] == [1, 2]
    skipped = [json.loads(line) for line in open(tmp_path / "run" / "skipped.jsonl")]
    assert skipped and all(s["record"] == 1 for s in skipped)
    assert "over data.max_prompt_tokens = 700" in skipped[0]["reason"] and "with no dialogue history" in skipped[0]["reason"]
    rows = read_metrics(str(tmp_path / "run"))
    assert rows[-1]["epoch"] == pytest.approx(t.sampler.epoch + t.sampler.pos / 4) and rows[-1]["epoch"] >= 1.0
    assert rows[0]["epoch"] < rows[1]["epoch"] and rows[-1]["samples_skipped"] == len(skipped)


@pytest.mark.slow
def test_sft_and_grpo_build_the_prompt_show_prompt_prints(data, tmp_path, capsys, monkeypatch):
    from fastebm.cli import main
    from fastebm.data.prompts import VIDEO_PAD
    from fastebm.data.video import load_video_sample
    from fastebm.train.sft import SFTTrainer
    from fastebm.train.trainer import Trainer

    d, recs = data
    system, user = tmp_path / "system.txt", tmp_path / "user.txt"
    system.write_text("ROLE: {assistant_name} ({movie})\n{assistant_profile}\nTags: <{perception_tag}> "
                      "<{reasoning_tag}> <{answer_tag}>\n")
    user.write_text("PARTNER: {user_name}\n{user_profile}\nSO FAR:\n{dialogue}\n")
    prompt = [f"prompt.system_file={system}", f"prompt.user_file={user}", "data.max_prompt_tokens=700"]
    sft = SFTTrainer(load_config(SFT, overrides(d, tmp_path / "sft", *prompt)))
    grpo = Trainer(load_config(TINY, overrides(d, tmp_path / "grpo", *prompt, "rewards.enabled=['format']",
                                               "rewards.weights={format=1.0}")))
    tok = grpo.policy.tokenizer
    for i in (0, 2):
        video = load_video_sample(str(d / recs[i]["video_path"]), grpo.cfg.video, **grpo._video_sample_kwargs)
        a, b = sft.batches._prompt(sft.records[i], video), grpo.batches._prompt(grpo.records[i], video)
        assert a.ids == b.ids
        text = tok.decode(b.ids, skip_special_tokens=False)
        assert f"ROLE: {recs[i]['assistant']}" in text and "PARTNER: " in text and "SO FAR:" in text
        monkeypatch.chdir(ROOT)
        assert main(["data", "show-prompt", TINY, *overrides(d, tmp_path / "show", *prompt), "--index", str(i)]) == 0
        shown = capsys.readouterr().out
        start, end = shown.index("[video: "), shown.index("]<|vision_end|>") + 1
        assert shown[:start] + VIDEO_PAD * video.num_video_tokens + shown[end:] == text  # exactly what trains
    sft.close()
    grpo.close()


def test_fixed_temporal_spacing_reaches_the_positions(tmp_path):
    """video.second_per_grid = 1.0 (the released run) replaces the measured spacing in the prompt's video,
    so Qwen2.5-VL's M-RoPE time positions change; 0 keeps the measured one."""
    from fastebm.config import DataConfig, VideoConfig
    from fastebm.data.records import Profiles, RecordSampler, parse_record
    from fastebm.data.sample import make_records
    from fastebm.model.prefix import prefix_positions
    from fastebm.train.batches import BatchSource
    from fastebm.train.builders import SkipRecorder, video_geometry
    from fastebm.train.parallel import Dist

    from helpers import clip_sample, tiny_model

    lm = tiny_model("qwen25vl", str(tmp_path / "models"))
    geometry = video_geometry(lm.model)
    # 10 s at 8 fps, at most 8 frames: sampled at 0.8 fps, so 2.5 s per temporal patch when measured
    video = clip_sample(str(tmp_path / "long.webm"), num_frames=80, fps=8.0, geometry=geometry)
    assert video.second_per_grid_ts == pytest.approx(2.5, rel=0.05)
    rec = parse_record(make_records(1)[0], "sample.json", 0)
    out = {}
    for spacing in (0.0, 1.0):
        source = BatchSource([rec], RecordSampler(1, 0), Profiles(), lm.tokenizer, SkipRecorder(str(tmp_path), Dist(),
                             lambda: 0), Dist(), prompts_per_step=1, data_cfg=DataConfig(),
                             video_cfg=VideoConfig(second_per_grid=spacing, num_workers=0), geometry=geometry,
                             records_file="sample.json")
        prompt = source._prompt(rec, video)
        source.close()
        out[spacing] = (prompt.video.second_per_grid_ts, prefix_positions(lm.model, prompt, "cpu")[0])
    assert out[0.0][0] == video.second_per_grid_ts and out[1.0][0] == 1.0
    t_measured, t_fixed = out[0.0][1][0], out[1.0][1][0]  # the time axis of the M-RoPE positions
    assert not torch.equal(t_measured, t_fixed) and torch.equal(out[0.0][1][1:], out[1.0][1][1:])
