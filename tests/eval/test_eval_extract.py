"""Reading a generated output: the lenient answer (as the judge reads it), the strict answer (as the
VideoQA scorers read it), and the parts ``fastebm generate`` writes."""
import pytest

from fastebm.eval.extract import lenient_answer, parse_output, strict_answer
from fastebm.rewards.format import format_reward


@pytest.mark.parametrize("text, expected", [
    ("<vision>a door</vision><think>he waits</think><answer> Open it. </answer>", ("Open it.", True)),
    ("<vision>a door</vision><think>he waits</think><answer>Open it, now", ("Open it, now", True)),  # cut by the limit
    ("<ANSWER>Loud</Answer>", ("Loud", True)),                                                    # any case
    ("<answer>first</answer> and <answer>second</answer>", ("first", True)),
    ("<vision>a door</vision>\n<think>he waits</think>\nJust go.", ("Just go.", False)),          # untagged reply
    ("Just go.", ("Just go.", False)),                                                             # vanilla
    ("<vision>only seeing</vision><think>and thinking</think>", (None, False)),
    ("<answer>   </answer>", (None, True)),
    ("", (None, False)),
    ("<think>x</think> stray </answer> tag", ("stray  tag", False)),
])
def test_lenient_answer(text, expected):
    assert lenient_answer(text) == expected


def test_lenient_answer_uses_the_configured_tags():
    text = "<see>a door</see><reason>x</reason><say>Go.</say>"
    assert lenient_answer(text, ("see", "reason", "say")) == ("Go.", True)
    assert lenient_answer("<see>a door</see> Go.", ("see", "reason", "say")) == ("Go.", False)


def test_strict_answer_needs_a_closed_block():
    assert strict_answer("<think>t</think><answer> 2 \n</answer>") == "2"
    assert strict_answer("<answer>2") is None
    assert strict_answer("<ANSWER>yes</ANSWER>") is None
    assert strict_answer("<ANSWER>yes</ANSWER>", ignore_case=True) == "yes"


def test_parse_output_fields():
    good = "<vision>a red light</vision>\n<think>danger</think>\n<answer>Run.</answer>"
    p = parse_output(good)
    assert p == {"answer": "Run.", "answer_tagged": True, "vision": "a red light", "think": "danger",
                 "format_reward": 5.0, "format_strict": True}
    bad = "<vision>a red light</vision> <answer>Run."
    p = parse_output(bad)
    assert p["answer"] == "Run." and p["think"] is None and p["format_reward"] == format_reward(bad)
    assert not p["format_strict"]
