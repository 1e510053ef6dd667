"""Tiny Qwen2-VL / Qwen2.5-VL through the real loading code; rollout and scoring passes agree.

The key check: the log-probs the trainer computes from completion hidden states (its own M-RoPE
positions, right padding, lm_head applied by the loss) equal the log-probs of the very logits
``generate`` sampled from. That ties rollout, scoring and training to one position function.
"""
import pytest
import torch

from fastebm.config import RolloutConfig
from fastebm.model.logprobs import training_logprobs
from fastebm.model.forward import completion_hidden_states, lm_head_weight
from fastebm.model.rollout import rollout

from helpers import clip_sample, make_prompt, tiny_model


@pytest.fixture(scope="module", params=["qwen2vl", "qwen25vl"])
def lm(request, tmp_path_factory):
    return tiny_model(request.param, str(tmp_path_factory.getbasetemp() / "models"))


@pytest.fixture(scope="module")
def prompts(lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    g = {k: getattr(lm.model.config.vision_config, k) for k in ("patch_size", "temporal_patch_size")}
    g["merge_size"] = lm.model.config.vision_config.spatial_merge_size
    v1 = clip_sample(str(d / "a.webm"), "vp9", seed=1, geometry=g)
    v2 = clip_sample(str(d / "b.mp4"), "h264", seed=2, num_frames=40, width=128, height=96, geometry=g)
    # different prompt lengths (dialogue history) and different videos in one batch
    return [make_prompt(lm, v1, 0, history=1), make_prompt(lm, v2, 4, history=0)]


def test_loaded_through_from_pretrained(lm):
    assert lm.family in ("qwen2_vl", "qwen2_5_vl")
    assert lm.model.config.video_token_id == lm.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert lm.model.dtype == torch.float32


def test_rollout_shapes_and_eos(lm, prompts):
    torch.manual_seed(0)
    cfg = RolloutConfig(group_size=3, temperature=1.0, max_new_tokens=6)
    r = rollout(lm.model, lm.tokenizer, prompts, cfg)
    assert r.prompt_index == [0, 0, 0, 1, 1, 1]
    assert all(1 <= len(c) <= 6 for c in r.completion_ids)
    eos = lm.tokenizer.eos_token_id
    for c, trunc in zip(r.completion_ids, r.truncated):
        assert (eos not in c) == trunc and (trunc or c[-1] == eos)
        assert lm.model.config.video_token_id not in c
    assert r.prefill_tokens == 3 * (len(prompts[0].ids) + len(prompts[1].ids))


def test_greedy_group_is_identical(lm, prompts):
    cfg = RolloutConfig(group_size=3, temperature=0.0, max_new_tokens=5)
    r = rollout(lm.model, lm.tokenizer, prompts[:1], cfg)
    assert r.completion_ids[0] == r.completion_ids[1] == r.completion_ids[2]


@torch.no_grad()
def test_scoring_logprobs_equal_generate_logits(lm, prompts):
    """Per prompt: logits generate() used at each step vs the packed, padded scoring forward."""
    model = lm.model
    from fastebm.model.forward import video_inputs

    comps, index, expected = [], [], []
    for p_i, p in enumerate(prompts):
        ids = torch.tensor([p.ids])
        v = video_inputs([p.video], "cpu")
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=v["pixel_values_videos"],
                  video_grid_thw=v["video_grid_thw"], mm_token_type_ids=(ids == model.config.video_token_id).int() * 2)
        if model.config.model_type == "qwen2_5_vl":
            kw["second_per_grid_ts"] = v["second_per_grid_ts"]
        out = model.generate(**kw, max_new_tokens=6 + 2 * p_i, min_new_tokens=6 + 2 * p_i, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:]
        logits = torch.stack(out.logits, 1)[0]  # (T, V) raw logits
        expected.append(torch.log_softmax(logits.double(), -1).gather(1, new[:, None]).squeeze(1))
        comps.append(new.tolist())
        index.append(p_i)
    # both completions in ONE padded batch, prompts of different lengths, completions of different lengths
    cb = completion_hidden_states(model, prompts, comps, index)
    lp = training_logprobs(cb.hidden, lm_head_weight(model), cb.ids, kernel="eager")
    for b, e in enumerate(expected):
        n = len(e)
        assert int(cb.mask[b].sum()) == n
        torch.testing.assert_close(lp[b, :n].double(), e, atol=1e-4, rtol=0)


def test_gradients_flow_to_vision_tower(lm, prompts):
    model = lm.model
    cb = completion_hidden_states(model, prompts[:1], [[5, 7, 9]], [0])
    training_logprobs(cb.hidden, lm_head_weight(model), cb.ids, kernel="eager").sum().backward()
    vis = [p for n, p in model.named_parameters() if "visual" in n and p.grad is not None]
    assert vis and any(float(p.grad.abs().sum()) > 0 for p in vis)
    model.zero_grad(set_to_none=True)
