"""Format reward (exact definition) and the ROUGE-L accuracy reward against the rouge-score package."""
import pytest

from fastebm.rewards import format_reward, extract_tag
from fastebm.rewards.accuracy import rouge_l_f1

GOOD = "<vision>a red shape</vision>\n<think>danger</think>\n<answer>Run.</answer>"


@pytest.mark.parametrize("text,expected", [
    (GOOD, 5.0),
    ("", -5.0),                                                    # nothing: 6 x -0.5, -1, -1
    ("  " + GOOD + "\n", 5.0),                                     # surrounding whitespace is stripped
    ("hi " + GOOD, 3.5),                                           # text before <vision>
    (GOOD + " bye", 3.5),                                          # text after </answer>
    ("<think>t</think><vision>v</vision><answer>a</answer>", 2.5),  # wrong order: 3 + 0 - 1 + 0.5
    (GOOD + "<answer>again</answer>", 3.0),                        # duplicated answer tags: 2 - 1 + 1 + 0.5 + 0.5
    ("<vision>v</vision><answer>a</answer>", 2.0),                 # missing think: 2 - 1 + 0 + 0.5 + 0.5
    ("<vision></vision><think></think><answer></answer>", 5.0),    # empty blocks are well-formed
    ("<vision>v<think>t</think></vision><answer>a</answer>", 4.0),  # nested: 3 + 0 (order fails) + 0.5 + 0.5
])
def test_format_reward_table(text, expected):
    assert format_reward(text) == pytest.approx(expected)


def test_format_reward_custom_tags_and_range():
    t = "<perception>p</perception><think>t</think><answer>a</answer>"
    assert format_reward(t, ("perception", "think", "answer")) == 5.0
    assert format_reward(t) < 5.0


def test_extract_tag():
    assert extract_tag(GOOD, "answer") == "Run."
    assert extract_tag("no tags", "answer") is None


def test_rouge_l_matches_rouge_score_package():
    from rouge_score import rouge_scorer  # in the dev extra
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("the cat sat on the mat", "the cat is on the mat"), ("stay behind me", "stay behind me now"),
             ("completely different", "words here"), ("a b c d e", "e d c b a")]
    for cand, ref in pairs:
        assert rouge_l_f1(cand, ref) == pytest.approx(scorer.score(ref, cand)["rougeL"].fmeasure, abs=1e-9)
    assert rouge_l_f1("", "x") == 0.0
