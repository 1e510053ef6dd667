"""CLIP: scores equal open_clip called directly (max and sentence top-k); one text pass per step; frame
embeddings computed once per clip (memory and disk cache); no <vision> block scores 0."""
import os

import pytest
import torch

from fastebm.config import RewardsConfig
from fastebm.rewards import RewardContext, build_rewards
from fastebm.rewards.text import clip_sentences
from fastebm.tiny import ensure_tiny_clip

from helpers import inputs_for

COMPS = [
    "<vision>A red square moves left. Two figures argue by the door!\n1. A wand on the table</vision><think>t</think>",
    "<vision>dark</vision><answer>x</answer>",
    "no vision block here",
    "<vision>   </vision><think>t</think>",
    "<vision>Blue light fills the hall? Someone is running fast.</vision>",
    "<vision>" + "very long description " * 40 + "</vision>",       # past 77 tokens: truncated, as CLIP
]


@pytest.fixture(scope="module")
def direct(model_dir):
    """The same tiny model, loaded separately with open_clip's own calls."""
    import open_clip

    cfg_json, weights = ensure_tiny_clip(model_dir)
    open_clip.add_model_config(cfg_json)
    name = os.path.splitext(os.path.basename(cfg_json))[0]
    return open_clip.create_model(name, pretrained=weights).eval(), open_clip.get_tokenizer(name)


def _direct_frames(model, video):
    from fastebm.data.video import clip_pixel_values

    with torch.no_grad():
        return model.encode_image(clip_pixel_values(video.clip_frames), normalize=True)


def _direct_text(model, tok, texts):
    with torch.no_grad():
        return model.encode_text(tok(texts), normalize=True)


def _reward(model_dir, mode, video_cache_dir=""):
    cfg = RewardsConfig()
    cfg.clip.tiny, cfg.clip.mode = True, mode
    return build_rewards(["clip"], cfg, RewardContext(tiny_cache_dir=model_dir, video_cache_dir=video_cache_dir))["clip"]


def test_max_mode_equals_open_clip(records, prompts, videos, model_dir, direct):
    model, tok = direct
    fn = _reward(model_dir, "max")
    out = fn(COMPS, inputs_for(records, prompts, 3))
    assert out[2] == 0.0 and out[3] == 0.0                   # no block / empty block
    for i in (0, 1, 4, 5):
        text = COMPS[i].split("<vision>")[1].split("</vision>")[0].strip()
        f = _direct_frames(model, videos[i // 3])
        t = _direct_text(model, tok, [text])[0]
        assert out[i] == pytest.approx(float((f @ t).max()), abs=1e-5)


def test_sentence_topk_equals_open_clip(records, prompts, videos, model_dir, direct):
    model, tok = direct
    fn = _reward(model_dir, "sentence_topk")
    out = fn(COMPS, inputs_for(records, prompts, 3))
    assert clip_sentences("A red square moves left. Two figures argue by the door!\n1. A wand on the table") == \
        ["A red square moves left", "Two figures argue by the door", "A wand on the table"]
    assert out[2] == 0.0 and out[3] == 0.0
    for i in (0, 1, 4):
        text = COMPS[i].split("<vision>")[1].split("</vision>")[0].strip()
        f = _direct_frames(model, videos[i // 3])                    # (K, D)
        sents = clip_sentences(text)
        sim = f @ _direct_text(model, tok, sents).T                  # (K, S)
        k = max(1, int(f.shape[0] * 0.2))
        per_sentence = [sorted(sim[:, j].tolist(), reverse=True)[:k] for j in range(len(sents))]
        expected = sum(sum(p) / k for p in per_sentence) / len(sents)
        assert out[i] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("mode", ["max", "sentence_topk"])
def test_one_text_pass_per_step_and_frames_once_per_clip(records, prompts, model_dir, mode, count, tmp_path):
    fn = _reward(model_dir, mode, str(tmp_path / "vcache"))
    text, image = count(fn.model.model, "encode_text"), count(fn.model.model, "encode_image")
    for G in (3, 8):
        comps = (COMPS * 3)[:2 * G]
        text.calls = 0
        fn(comps, inputs_for(records, prompts, G))
        assert text.calls == 1, G
    assert image.calls == 1                       # both clips embedded in the first step's one image pass
    # a new reward instance (a resumed run) finds the embeddings on disk
    fn2 = _reward(model_dir, mode, str(tmp_path / "vcache"))
    image2 = count(fn2.model.model, "encode_image")
    assert fn2(COMPS, inputs_for(records, prompts, 3)) == pytest.approx(fn(COMPS, inputs_for(records, prompts, 3)))
    assert image2.calls == 0
    assert os.path.isdir(tmp_path / "vcache" / "clip_embeddings")


def test_missing_weights_fail_loudly(tmp_path):
    cfg = RewardsConfig()
    cfg.clip.pretrained = str(tmp_path / "none.bin")
    with pytest.raises(FileNotFoundError, match="rewards.clip.pretrained"):
        build_rewards(["clip"], cfg, RewardContext())
