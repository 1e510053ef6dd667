"""Accuracy: BERTScore F1 equals the bert-score package on a tiny local encoder; one encoder pass per step;
empty answers score 0; ROUGE-L without an encoder."""
import pytest

from fastebm.config import RewardsConfig
from fastebm.rewards import RewardContext, build_rewards
from fastebm.rewards.accuracy import BertScorer, default_num_layers
from fastebm.tiny import ensure_tiny_bert

from helpers import inputs_for

CANDS = ["Stay behind me, Harry.", "We must go now!", "hello there friend", "a", "The tide is turning."]
REFS = ["Stay close to me.", "we go now", "the dark lord rises", "Harry", "The tide is turning, we have an hour."]


@pytest.fixture(scope="module")
def bert_path(model_dir):
    return ensure_tiny_bert(model_dir)


@pytest.mark.parametrize("layers", [1, 2])
def test_bertscore_equals_bert_score_package(bert_path, layers):
    import bert_score  # in the dev extra
    _, _, F = bert_score.score(CANDS, REFS, model_type=bert_path, num_layers=layers, idf=False, lang="en",
                               rescale_with_baseline=False)
    mine = BertScorer(bert_path, num_layers=layers).score(CANDS, REFS)
    assert mine == pytest.approx(F.tolist(), abs=1e-5)


def test_bertscore_hand_greedy_match(bert_path):
    """Independent of the package: greedy matching written out by hand for one pair."""
    import torch

    s = BertScorer(bert_path, num_layers=2)
    cand, ref = CANDS[0], REFS[0]
    emb, mask, ids = s.embed([cand, ref])
    c = emb[0, :len(ids[0])]
    r = emb[1, :len(ids[1])]
    c, r = c / c.norm(dim=-1, keepdim=True), r / r.norm(dim=-1, keepdim=True)
    sim = c @ r.T
    inner_c, inner_r = range(1, len(ids[0]) - 1), range(1, len(ids[1]) - 1)  # [CLS]/[SEP] weigh 0
    P = sum(float(sim[i].max()) for i in inner_c) / len(inner_c)
    R = sum(float(sim[:, j].max()) for j in inner_r) / len(inner_r)
    assert s.score([cand], [ref])[0] == pytest.approx(2 * P * R / (P + R), abs=1e-5)
    assert s.score([ref], [ref])[0] == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(mask.sum(1), torch.tensor([len(ids[0]), len(ids[1])]))


def test_default_layers_follow_bertscore():
    class C:
        num_hidden_layers = 48
        _name_or_path = "microsoft/deberta-xlarge-mnli"

    assert default_num_layers("/models/whatever", C()) == 40
    C._name_or_path = ""
    assert default_num_layers("/models/deberta-xlarge-mnli", C()) == 40
    assert default_num_layers("/models/my-encoder", C()) == 48


def _reward(cfg, model_dir):
    return build_rewards(["accuracy"], cfg, RewardContext(tiny_cache_dir=model_dir))["accuracy"]


def test_reward_one_encoder_pass_and_empty_answers(records, prompts, model_dir, count):
    cfg = RewardsConfig()
    cfg.accuracy.tiny = True
    fn = _reward(cfg, model_dir)
    G = 4
    ref0, ref1 = records[0].reference_answer, records[1].reference_answer
    comps = [f"<vision>v</vision><think>t</think><answer>{ref0}</answer>", "<answer></answer>",
             "<answer>   </answer>", "no answer tag at all " + ref0,
             f"<answer>{ref1}</answer>", "<answer>something else entirely</answer>", f"<answer>{ref0}</answer>",
             "<answer>x</answer>"]
    enc = count(fn.scorer.model)
    out = fn(comps, inputs_for(records, prompts, G))
    assert enc.calls == 1                        # the whole step: one encoder forward
    assert out[0] == pytest.approx(1.0, abs=1e-5) and out[4] == pytest.approx(1.0, abs=1e-5)
    assert out[1] == out[2] == out[3] == 0.0     # empty or missing answers never score
    assert all(0.0 <= x <= 1.0 for x in out)
    expected = fn.scorer.score([comps[5][8:-9], ref0, "x"], [ref1, ref1, ref1])
    assert out[5:] == pytest.approx([min(1, max(0, e)) for e in expected], abs=1e-6)
    # G = 8: still one pass
    enc.calls = 0
    fn(comps + comps, inputs_for(records, prompts, 8))
    assert enc.calls == 1


def test_rouge_without_encoder(records, prompts):
    from fastebm.rewards.accuracy import rouge_l_f1

    fn = build_rewards(["accuracy"], RewardsConfig(), RewardContext())["accuracy"]
    ref = records[0].reference_answer
    out = fn([f"<answer>{ref}</answer>", "<answer></answer>", "<answer>the tide</answer>", "x"],
             inputs_for(records[:1], prompts[:1], 4))
    assert out == [1.0, 0.0, rouge_l_f1("the tide", ref), 0.0]


def test_missing_encoder_path_fails_loudly(tmp_path):
    cfg = RewardsConfig()
    cfg.accuracy.model_path = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="rewards.accuracy.model_path"):
        build_rewards(["accuracy"], cfg, RewardContext())
