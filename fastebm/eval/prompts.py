"""Every prompt the evaluation commands give a model, decided here and nowhere else.

``eval_prompt`` is the one adapter for records (``fastebm generate``, and the PCG teacher of
``fastebm eval auto``); ``videoqa_prompt`` is the VideoQA benchmarks' prompt. Modes:

  ebm      the training prompt, exactly as GRPO rolls out from (``fastebm.data.prompts``:
           ``build_messages`` + ``encode_prompt``): vision, think and answer tags
  cot      fastebm's own plain chain-of-thought prompt (``cot_system.txt`` / ``cot_user.txt``):
           think, then answer
  vanilla  the character's line only, no reasoning and no tags (``vanilla_*.txt``)

The cot and vanilla texts, and every VideoQA text, are template files (``fastebm.eval.templates``;
``--templates DIR`` replaces them by name). Every prompt holds one video, rendered by the model's
own chat template with the video placeholder expanded to the clip's tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence

from fastebm.data.prompts import build_messages, encode_prompt
from fastebm.data.records import Profiles, Record
from fastebm.eval.templates import render_template

PROMPT_MODES = ("ebm", "cot", "vanilla")


def _history(record: Record, max_history_turns: int) -> str:
    turns = record.dialogue[-max_history_turns:] if max_history_turns > 0 else record.dialogue
    return "\n".join(f"{t.speaker}: {t.utterance}" for t in turns) or "(the scene opens)"


def _video_messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": user}]}]


def eval_prompt(record: Record, mode: str, *, tokenizer, num_video_tokens: int, profiles: Profiles,
                tags: Sequence[str] = ("vision", "think", "answer"), max_history_turns: int = 0,
                template_dir: str = "") -> list[int]:
    """Token ids of the evaluation prompt of ``record`` in ``mode`` (``PROMPT_MODES``), the video
    placeholder expanded to ``num_video_tokens``. ``profiles``: the recipe's character profiles;
    ``tags`` and ``max_history_turns``: the recipe's ``data.tags`` / ``data.max_history_turns``."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode {mode!r}: expected one of {', '.join(PROMPT_MODES)}")
    profile = profiles.get(record.data_source, record.assistant)
    if mode == "ebm":
        messages = build_messages(record, profile, tags, max_history_turns)
    else:
        v, t, a = tags
        values = dict(assistant=record.assistant, user=record.user, data_source=record.data_source, profile=profile,
                      user_profile=profiles.get(record.data_source, record.user),
                      history=_history(record, max_history_turns), vision_tag=v, think_tag=t, answer_tag=a)
        messages = _video_messages(render_template(f"{mode}_system.txt", values, template_dir),
                                   render_template(f"{mode}_user.txt", values, template_dir))
    return encode_prompt(tokenizer, messages, num_video_tokens)


def videoqa_prompt(question: str, options: Optional[Sequence[str]], mode: str, *, tokenizer, num_video_tokens: int,
                   tags: Sequence[str] = ("vision", "think", "answer"), template_dir: str = "") -> list[int]:
    """Token ids of a VideoQA prompt: multiple choice when ``options`` is given (answer: the option's
    number), else yes/no. The system text asks for the tagged output of ``mode``."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode {mode!r}: expected one of {', '.join(PROMPT_MODES)}")
    v, t, a = tags
    answer_format = render_template("videoqa_answer_choice.txt" if options else "videoqa_answer_yesno.txt", {},
                                    template_dir)
    opts = "Options:\n" + "\n".join(f"({i}) {o}" for i, o in enumerate(options)) if options else ""
    values = dict(question=question, options=opts, answer_format=answer_format, vision_tag=v, think_tag=t,
                  answer_tag=a)
    messages = _video_messages(render_template(f"videoqa_{mode}_system.txt", values, template_dir),
                               render_template("videoqa_user.txt", values, template_dir))
    return encode_prompt(tokenizer, messages, num_video_tokens)
