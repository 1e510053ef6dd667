"""The trainer end to end on the tiny recipe: metrics, checkpoints, exact resume, bad input, NaN,
Ctrl-C, and an RL sanity check that the loop learns (and unlearns when the advantage flips)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastebm.config import load_config
from fastebm.rewards import REWARDS, register
from fastebm.rewards.format import format_reward
from fastebm.train.metrics import read_metrics
from fastebm.train.trainer import Trainer, TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "recipes", "tiny.toml")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    return {"models": str(base / "models"), "data": str(base / "sample")}


def cfg_for(env, out, *overrides):
    return load_config(TINY, [f"run.output_dir={out}", f"model.tiny_cache_dir={env['models']}",
                              f"data.sample_dir={env['data']}", "log.progress=false", *overrides])


def strip_times(m):
    return {k: v for k, v in m.items() if not k.startswith("time/")}


REQUIRED = ["step", "loss", "kl", "reward/total", "reward/format", "reward/accuracy", "adv/std", "tokens/prefix",
            "tokens/completion", "time/rollout_s", "time/score_s", "time/update_s", "time/step_s", "samples_skipped"]


@pytest.mark.slow
def test_cli_trains_tiny_recipe(env, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastebm.cli", "train", TINY, "train.steps=2", f"run.output_dir={out}",
           f"model.tiny_cache_dir={env['models']}", f"data.sample_dir={env['data']}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["tokens/prefix"] > 4 * r["tokens/completion"] / 4  # video prefix is long
    assert load_config(str(out / "config.toml")).train.steps == 2
    # the final checkpoint is a Hugging Face model directory
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(str(out / "checkpoints" / "2"))
    assert m.config.model_type == "qwen2_vl"
    # the run's report (fastebm.eval.report), written at the end, and the log says where
    page = (out / "report" / "index.html").read_text()
    for name in ("reward_format.png", "reward_pcg.png", "reward_total.png", "kl.png", "loss.png", "time.png"):
        assert (out / "report" / name).is_file() and f"src='{name}'" in page
    assert "report:" in res.stdout + res.stderr


def test_cli_rejects_unknown_key(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "train", TINY, "train.stepz=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown key 'train.stepz'" in res.stderr and "command line" in res.stderr


def test_resume_gives_identical_metrics(env, tmp_path):
    a = tmp_path / "a"
    full = Trainer(cfg_for(env, a, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0")).train()
    assert os.path.isdir(a / "checkpoints" / "2") and os.path.isdir(a / "checkpoints" / "4")
    b = tmp_path / "b"
    os.makedirs(b / "checkpoints")
    shutil.copytree(a / "checkpoints" / "2", b / "checkpoints" / "2")
    t = Trainer(cfg_for(env, b, "train.steps=4", "train.resume=true"))
    assert t.step == 2
    resumed = t.train()
    assert [m["step"] for m in resumed] == [3, 4]
    for x, y in zip(full[2:], resumed):
        assert strip_times(x) == strip_times(y)
    # weights too
    from safetensors.torch import load_file

    sa = load_file(str(a / "checkpoints" / "4" / "model.safetensors"))
    sb = load_file(str(b / "checkpoints" / "4" / "model.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_run_of_two_resumed_to_four_equals_run_of_four(env, tmp_path):
    """The literal scenario, with a constant schedule (a cosine horizon changes with train.steps)."""
    const = ["train.lr_schedule=constant", "train.warmup_steps=0", "train.checkpoint_every=0"]
    full = Trainer(cfg_for(env, tmp_path / "a", "train.steps=4", *const)).train()
    Trainer(cfg_for(env, tmp_path / "b", "train.steps=2", *const)).train()
    resumed = Trainer(cfg_for(env, tmp_path / "b", "train.steps=4", "train.resume=true", *const)).train()
    assert strip_times(resumed[-1]) == strip_times(full[-1])
    assert [r["step"] for r in read_metrics(str(tmp_path / "b"))] == [1, 2, 3, 4]


def test_checkpoint_from_another_run_is_refused(env, tmp_path):
    a = tmp_path / "a"
    Trainer(cfg_for(env, a, "train.steps=1")).train()
    meta = a / "checkpoints" / "1" / "meta.json"
    m = json.loads(meta.read_text())
    m["fingerprint"]["num_records"] = 999
    meta.write_text(json.dumps(m))
    from fastebm.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="meta.json: field 'fingerprint.num_records'"):
        Trainer(cfg_for(env, a, "train.steps=2", "train.resume=true"))


def _bad_dataset(env, tmp_path):
    from fastebm.data.sample import write_sample_dataset

    src = write_sample_dataset(env["data"])
    d = tmp_path / "bad"
    shutil.copytree(env["data"], d)
    recs = json.loads(open(src["train"]).read())[:6]
    with open(d / recs[1]["video_path"], "r+b") as f:  # truncated: the header survives, the frames do not
        f.truncate(300)
    os.remove(d / recs[2]["video_path"])                # missing
    (d / recs[3]["video_path"]).write_bytes(b"")         # zero bytes
    recs[4]["target"] = {"speaker": "x"}                 # malformed record
    (d / "train.json").write_text(json.dumps(recs))
    return d, recs


def test_bad_samples_are_skipped_and_recorded(env, tmp_path):
    d, recs = _bad_dataset(env, tmp_path)
    out = tmp_path / "run"
    hist = Trainer(cfg_for(env, out, "train.steps=3", f"data.train={d / 'train.json'}", f"data.video_root={d}",
                           "rollout.group_size=2")).train()
    skipped = [json.loads(ln) for ln in open(out / "skipped.jsonl")]
    assert hist[-1]["samples_skipped"] == len(skipped)
    files = {os.path.basename(s.get("file", "")) for s in skipped}
    for i in (1, 2, 3):
        assert os.path.basename(recs[i]["video_path"]) in files
    malformed = [s for s in skipped if "target.utterance" in s["reason"]]
    assert len(malformed) == 1 and "record 4" in malformed[0]["reason"]
    assert all(s["reason"] for s in skipped)


if "nan_at_2" not in REWARDS:
    @register("nan_at_2")
    def _nan_reward(cfg, ctx):
        calls = {"n": 0}

        def fn(completions, inputs):
            calls["n"] += 1
            return [float("nan") if calls["n"] == 2 else 0.0 for _ in completions]
        return fn


def test_nan_loss_stops_with_last_checkpoint_intact(env, tmp_path):
    out = tmp_path / "run"
    t = Trainer(cfg_for(env, out, "train.steps=4", "train.checkpoint_every=1", "rewards.enabled=['format','nan_at_2']",
                        "rewards.weights={format=1.0,nan_at_2=1.0}"))
    with pytest.raises(TrainingError, match="non-finite loss.*step 2.*checkpoints/1"):
        t.train()
    assert os.path.isdir(out / "checkpoints" / "1") and not os.path.exists(out / "checkpoints" / "2")
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(str(out / "checkpoints" / "1"))


@pytest.mark.slow
def test_ctrl_c_saves_and_exits(env, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastebm.cli", "train", TINY, "train.steps=200", f"run.output_dir={out}",
           f"model.tiny_cache_dir={env['models']}", f"data.sample_dir={env['data']}", "train.checkpoint_every=0"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    steps = [r["step"] for r in read_metrics(str(out))]
    assert steps and steps[-1] < 200
    assert os.path.isdir(out / "checkpoints" / str(steps[-1]))


if "neg_format" not in REWARDS:
    @register("neg_format")
    def _neg_format(cfg, ctx):
        return lambda completions, inputs: [-format_reward(c, ctx.tags) for c in completions]


def _format_curve(env, out, flip):
    enabled = "['format','neg_format']" if flip else "['format']"
    weights = "{format=0.0,neg_format=1.0}" if flip else "{format=1.0}"
    cfg = cfg_for(env, out, "train.steps=30", f"rewards.enabled={enabled}", f"rewards.weights={weights}",
                  "grpo.beta=0.0", "train.lr=1e-2", "rollout.group_size=8", "rollout.max_new_tokens=8",
                  "train.warmup_steps=0", "train.lr_schedule=constant", "train.micro_batch_size=16",
                  "train.checkpoint_every=0")
    r = [m["reward/format"] for m in Trainer(cfg).train()]
    return sum(r[:5]) / 5, sum(r[-5:]) / 5


@pytest.mark.slow
def test_rl_sanity_format_reward_is_learned_and_unlearned(env, tmp_path):
    """GRPO on the learnable format reward raises it; the same run with the advantage's sign flipped
    (reward -format, format logged with weight 0) lowers it. The loop learns, not just runs."""
    first, last = _format_curve(env, tmp_path / "up", flip=False)
    assert last > first + 1.0, (first, last)
    first_f, last_f = _format_curve(env, tmp_path / "down", flip=True)
    assert last_f < first_f, (first_f, last_f)


def test_each_clip_is_decoded_once_per_use(env, tmp_path):
    """Four rewards (CLIP reads frames too), reference and policy passes, decode-ahead threads: every
    clip drawn is decoded exactly once per use, and the step after the last is not decoded at all."""
    from fastebm.data.video import decode_stats, reset_decode_stats

    t = Trainer(cfg_for(env, tmp_path / "run", "train.steps=3", "rollout.group_size=2", "video.num_workers=2"))
    used = []
    orig = t.next_batch

    def spy():
        b = orig()
        used.extend(p.video.meta.path for p in b.prompts)
        return b

    t.next_batch = spy
    reset_decode_stats()
    t.train()
    st = decode_stats()
    assert len(used) == 6 and st["cache_hits"] == 0
    assert st["decodes"] == len(used)
    for path in set(used):
        assert st["by_path"][path] == used.count(path)


@pytest.mark.slow
def test_training_over_every_kind_of_bad_video(env, tmp_path):
    """Missing, empty, truncated, not a video, too few frames, absurd dimensions and a decoder that
    hangs: each is skipped with its reason, the run finishes, samples_skipped counts them all."""
    from fastebm.data.sample import write_sample_dataset
    from fastebm.data.synth import BAD_KINDS, BAD_REASONS, write_bad_video

    src = write_sample_dataset(env["data"])
    d = tmp_path / "bad"
    shutil.copytree(env["data"], d)
    recs = json.loads(open(src["train"]).read())[:2 + len(BAD_KINDS)]
    kinds = {}
    for i, kind in enumerate(BAD_KINDS):
        rel = f"./videos/bad_{kind}.webm"
        write_bad_video(str(d / rel), kind)
        recs[2 + i]["video_path"] = rel
        kinds[os.path.normpath(str(d / rel))] = kind
    (d / "train.json").write_text(json.dumps(recs))
    out = tmp_path / "run"
    try:
        hist = Trainer(cfg_for(env, out, "train.steps=2", f"data.train={d / 'train.json'}", f"data.video_root={d}",
                               "rollout.group_size=2", "video.timeout_s=3", "train.checkpoint_every=0")).train()
    finally:
        hang = d / "videos" / "bad_hang.webm"
        if hang.exists():  # release a reader still blocked on the named pipe
            try:
                os.close(os.open(str(hang), os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    skipped = [json.loads(ln) for ln in open(out / "skipped.jsonl")]
    assert [h["step"] for h in hist] == [1, 2]
    assert hist[-1]["samples_skipped"] == len(skipped)
    # the sampler comes round to a bad clip again in a later epoch: each draw is skipped again
    assert {kinds[os.path.normpath(s["file"])] for s in skipped} == set(BAD_KINDS)
    for s in skipped:
        kind = kinds[os.path.normpath(s["file"])]
        assert BAD_REASONS[kind] in s["reason"], (kind, s["reason"])


def test_lr_schedule_in_metrics(env, tmp_path):
    """metrics 'lr' is the rate each step's update used: linear warmup, then cosine down to min_lr_ratio."""
    import math

    from fastebm.train.builders import lr_lambda

    hist = Trainer(cfg_for(env, tmp_path / "run", "train.steps=5", "train.warmup_steps=2", "train.lr=0.01",
                           "train.min_lr_ratio=0.1", "rollout.group_size=2", "train.checkpoint_every=0")).train()
    lrs = [m["lr"] for m in hist]
    expected = [0.01 * lr_lambda(s, 5, 2, "cosine", 0.1) for s in range(5)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.01)
    assert lrs[3] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3))))


def test_tensorboard_scalars(env, tmp_path):
    """log.tensorboard = true writes every numeric metric of every step as a TensorBoard scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    hist = Trainer(cfg_for(env, out, "train.steps=2", "rollout.group_size=2", "log.tensorboard=true",
                           "train.checkpoint_every=0")).train()
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "kl", "reward/total", "reward/format", "time/step_s"} <= tags
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([m["loss"] for m in hist])


def test_precompute_fills_video_and_clip_caches_so_training_decodes_nothing(env, tmp_path):
    """`fastebm data precompute RECORDS --config RECIPE` decodes every clip once and embeds its CLIP
    frames; a run with that video.cache_dir then decodes no clip and runs no CLIP image pass."""
    from fastebm.cli.data import clip_embedder
    from fastebm.data.precompute import precompute, video_paths
    from fastebm.data.sample import write_sample_dataset
    from fastebm.data.video import decode_stats, reset_decode_stats

    src = write_sample_dataset(env["data"])
    cache = str(tmp_path / "cache")
    cfg = cfg_for(env, tmp_path / "run", "train.steps=2", "rollout.group_size=2", f"video.cache_dir={cache}")
    from fastebm.config import to_toml

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(to_toml(cfg))
    paths = video_paths(src["train"])
    res = precompute(paths, cfg.video, num_workers=0, embed_clips=clip_embedder(str(recipe), cache))
    assert res["decoded"] == len(paths) and res["clip_embedded"] == len(paths) and not res["skipped"]

    t = Trainer(cfg)
    calls = []
    model = t.rewards["clip"].model
    orig = model.encode_frames
    model.encode_frames = lambda clips: calls.append(len(clips)) or orig(clips)
    reset_decode_stats()
    t.train()
    st = decode_stats()
    assert st["decodes"] == 0 and st["cache_hits"] == 4
    # The trainer's CLIP reward finds every clip's frame embeddings in the precomputed cache (the
    # random policy rarely writes a <vision> block, so ask the reward's cache directly) ...
    from fastebm.data.video import load_video_sample
    from fastebm.rewards.clip import FrameEmbeddingCache, frame_embeddings

    clips = [load_video_sample(p, cfg.video, **t._video_sample_kwargs).clip_frames for p in paths[:5]]
    frame_embeddings(model, t.rewards["clip"].cache, clips)
    assert calls == []
    # ... which an empty cache does not (the control)
    frame_embeddings(model, FrameEmbeddingCache(model.key, str(tmp_path / "empty")), clips)
    assert calls == [5]
    t.close()
