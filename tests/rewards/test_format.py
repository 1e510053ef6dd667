"""The format reward: exact values on hand-made strings, and agreement with the reference code's function."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastebm.rewards import format_reward

V, T, A = "<vision>v</vision>", "<think>t</think>", "<answer>a</answer>"


@pytest.mark.parametrize("text,expected", [
    (f"{V}{T}{A}", 5.0),
    (f"{V}\n\n{T}\n{A}\n\n", 5.0),                         # plain text and whitespace between blocks
    (f"{V} so {T} then {A}", 5.0),                         # plain words between blocks keep the order
    (f"{V}<b>x</b>{T}{A}", 4.0),                            # another tag between blocks breaks the order
    (f"{V}{V}{T}{A}", 3.0),                                 # duplicated vision: 2 x -0.5 + 4 x 0.5 + 1 + .5 + .5
    (f"{V}{T}{A}{A}", 3.0),
    (f"{T}{A}", 0.5),                                       # no vision: 2 - 1 + 0 - 1 + 0.5
    (f"{V}{A}", 2.0),                                       # no think
    (f"{V}{T}", 0.5),                                       # no answer: 2 - 1 + 0 + 0.5 - 1
    (f"{A}{T}{V}", 1.0),                                    # reversed: 3 + 0 - 1 - 1
    (f"x{V}{T}{A}", 3.5),                                   # text before <vision>
    (f"{V}{T}{A}x", 3.5),                                   # text after </answer>
    (f"x{V}{T}{A}x", 2.0),
    ("<vision><think>t</think></vision><answer>a</answer>", 4.0),   # think nested in vision
    ("<vision></vision><think></think><answer></answer>", 5.0),    # empty blocks are well-formed
    ("<vision>v</vision><think>t</think><answer>a", 1.5),          # unclosed answer: 2.5 - .5 + 0 + .5 - 1
    ("</vision><vision>v<think>t</think><answer>a</answer>", 2.5),  # closing tag first: 3 + 0 - 1 + .5
    ("", -5.0),
    ("just a line", -5.0),
])
def test_format_reward_table(text, expected):
    assert format_reward(text) == expected


def reference_format_reward(content):
    """The reference code's format_reward (RP_RL.py), transcribed, for one completion."""
    tags = ["<vision>", "</vision>", "<think>", "</think>", "<answer>", "</answer>"]
    score = 0.0
    for tag in tags:
        score += 0.5 if content.count(tag) == 1 else -0.5
    if re.search(r"<vision>.*?</vision>[^<]*<think>.*?</think>[^<]*<answer>.*?</answer>", content, re.DOTALL):
        score += 1.0
    score += 0.5 if re.match(r"^\s*<vision>", content, re.DOTALL) else -1.0
    score += 0.5 if re.search(r"</answer>\s*$", content, re.DOTALL) else -1.0
    return score


PIECES = ["<vision>", "</vision>", "<think>", "</think>", "<answer>", "</answer>", "a", " ", "\n", "<", "x y", "\t"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14))
def test_format_reward_equals_reference_code(pieces):
    text = "".join(pieces)
    assert format_reward(text) == reference_format_reward(text)
    assert -5.0 <= format_reward(text) <= 5.0
