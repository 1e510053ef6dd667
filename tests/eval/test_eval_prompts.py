"""Evaluation prompts: the one adapter (ebm = the training prompt, token for token; cot / vanilla from
template files), VideoQA prompts, and template files a user can replace (unknown placeholders fail
naming the file)."""
import os
import re

import pytest

from fastebm.config import PromptConfig
from fastebm.data import DataError
from fastebm.data.prompts import build_messages, encode_prompt
from fastebm.data.records import Profiles, parse_record
from fastebm.data.sample import CHARACTERS, SOURCE, make_records
from fastebm.eval.prompts import eval_prompt, prompt_templates, videoqa_prompt
from fastebm.eval.templates import BUNDLED_DIR, TemplateError, load_template, render, render_template

from helpers import tiny_model


@pytest.fixture(scope="module")
def lm(model_dir):
    return tiny_model("qwen2vl", model_dir)


@pytest.fixture(scope="module")
def record():
    return parse_record(make_records()[0], "sample.json", 0)


PROFILES = Profiles({SOURCE: CHARACTERS})


def decoded(lm, ids):
    return lm.tokenizer.decode(ids)


def test_render_replaces_known_placeholders_and_keeps_json_braces():
    text = 'Say {name}. Reply {"VEG": "A"} or {{x}}.'
    assert render(text, {"name": "hi", "x": 1}, "t.txt") == 'Say hi. Reply {"VEG": "A"} or {1}.'


def test_unknown_placeholder_names_the_file():
    with pytest.raises(TemplateError, match=r"my\.txt: unknown placeholder \{nmae\}.*\{name\}"):
        render("Hello {nmae}", {"name": "x"}, "my.txt")


VIDEOQA = ["question", "options", "answer_format", "vision_tag", "think_tag", "answer_tag"]
CONTEXT = ["assistant", "user", "data_source", "assistant_profile", "user_profile", "dialogue", "reference"]
KEYS = {"videoqa_ebm_system.txt": VIDEOQA, "videoqa_cot_system.txt": VIDEOQA,
        "videoqa_vanilla_system.txt": VIDEOQA, "videoqa_user.txt": VIDEOQA, "videoqa_answer_choice.txt": [],
        "videoqa_answer_yesno.txt": [], "judge_system.txt": [], "judge_reask.txt": ["problem"],
        "judge_absolute.txt": CONTEXT + ["responses", "labels", "num_responses", "example"],
        "judge_pairwise.txt": CONTEXT + ["response_a", "response_b"]}


def test_every_bundled_template_renders_with_its_command_values():
    """A placeholder typo in a shipped template would only show at run time: render each one with
    exactly the values its command passes."""
    assert sorted(os.listdir(BUNDLED_DIR)) == sorted(KEYS)
    for name, keys in KEYS.items():
        text, _ = load_template(name)
        out = render(text, {k: f"<<{k}>>" for k in keys}, name)  # raises on a placeholder the command lacks
        assert text.strip() and not re.search(r"\{[A-Za-z_]\w*\}", out), name
    with pytest.raises(TemplateError, match="judge_pairwise.txt: unknown placeholder {response_a}"):
        render(load_template("judge_pairwise.txt")[0], {k: "x" for k in CONTEXT}, "judge_pairwise.txt")


def test_ebm_mode_is_the_training_prompt(lm, record):
    ids = eval_prompt(record, prompt_templates(PromptConfig(), "ebm"), tokenizer=lm.tokenizer, num_video_tokens=7,
                      profiles=PROFILES, max_history_turns=2)
    expected = encode_prompt(lm.tokenizer, build_messages(record, PROFILES.get(SOURCE, record.assistant),
                                                          ("vision", "think", "answer"), 2,
                                                          user_profile=PROFILES.get(SOURCE, record.user)), 7)
    assert ids == expected


@pytest.mark.parametrize("mode", ["cot", "vanilla"])
def test_cot_and_vanilla_prompts(lm, record, mode):
    ids = eval_prompt(record, prompt_templates(PromptConfig(), mode), tokenizer=lm.tokenizer, num_video_tokens=5,
                      profiles=PROFILES)
    pad = lm.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert ids.count(pad) == 5
    text = decoded(lm, ids)
    assert record.dialogue[-1].utterance in text and CHARACTERS[record.assistant] in text
    assert CHARACTERS.get(record.user, Profiles.NEUTRAL) in text
    assert ("<think>" in text) == (mode == "cot") and "<vision>" not in text
    assert text.rstrip().endswith("assistant")  # the generation prompt closes it


def test_prompt_config_replaces_a_mode_template(lm, record, tmp_path):
    (tmp_path / "cot_system.txt").write_text("CUSTOM SYSTEM for {assistant_name}\n")
    cfg = PromptConfig(cot_system_file=str(tmp_path / "cot_system.txt"))
    ids = eval_prompt(record, prompt_templates(cfg, "cot"), tokenizer=lm.tokenizer, num_video_tokens=1,
                      profiles=PROFILES)
    text = decoded(lm, ids)
    assert f"CUSTOM SYSTEM for {record.assistant}" in text
    assert "The conversation so far" in text  # cot_user.txt still fastebm's own
    (tmp_path / "cot_user.txt").write_text("{histroy}")
    cfg.cot_user_file = str(tmp_path / "cot_user.txt")
    with pytest.raises(DataError, match=r"cot_user.txt \(prompt.cot_user_file\): unknown placeholder \{histroy\}"):
        prompt_templates(cfg, "cot")


def test_unknown_mode(lm, record):
    with pytest.raises(ValueError, match="prompt mode 'fancy'"):
        prompt_templates(PromptConfig(), "fancy")


def test_videoqa_prompts(lm):
    ids = videoqa_prompt("What moves?", ["a cat", "a car"], "ebm", tokenizer=lm.tokenizer, num_video_tokens=3)
    text = decoded(lm, ids)
    assert "(0) a cat\n(1) a car" in text and "What moves?" in text and "<vision>" in text
    assert "only the number of the correct option" in text
    yn = decoded(lm, videoqa_prompt("Is it red?", None, "vanilla", tokenizer=lm.tokenizer, num_video_tokens=3))
    assert "yes or no" in yn and "(0)" not in yn and "<vision>" not in yn
    assert render_template("videoqa_answer_yesno.txt", {}) == "only yes or no"
