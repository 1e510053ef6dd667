"""Every prompt the evaluation commands give a model, decided here and nowhere else.

Record prompts (``fastebm generate``, and the PCG teacher of ``fastebm eval auto``) go through the
one prompt path the trainers use (``fastebm.data.prompts``: the ``[prompt]`` templates of a mode,
``fit_prompt``, ``data.max_prompt_tokens``). Modes (``fastebm.data.prompts.MODES``):

  ebm      the training prompt, token for token: vision, think and answer tags
  cot      think, then answer (``prompt.cot_system_file`` / ``cot_user_file``; fastebm's own by default)
  vanilla  the character's line only, no reasoning and no tags (``prompt.vanilla_*_file``)

``videoqa_prompt`` is the VideoQA benchmarks' prompt, from this package's template files
(``--templates DIR`` replaces them by name). Every prompt holds one video, rendered by the model's
own chat template with the video placeholder expanded to the clip's tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence

from fastebm.data.prompts import MODES, PromptTemplates, encode_prompt, fit_prompt, load_templates
from fastebm.data.records import Profiles, Record
from fastebm.eval.templates import render_template

PROMPT_MODES = tuple(MODES)


def prompt_templates(prompt_cfg, mode: str) -> PromptTemplates:
    """The ``[prompt]`` templates of ``mode`` (``PROMPT_MODES``), checked; load once per run."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode {mode!r}: expected one of {', '.join(PROMPT_MODES)}")
    return load_templates(prompt_cfg, mode)


def _video_messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": user}]}]


def eval_prompt(record: Record, templates: PromptTemplates, *, tokenizer, num_video_tokens: int,
                profiles: Optional[Profiles], tags: Sequence[str] = ("vision", "think", "answer"),
                max_history_turns: int = 0, max_prompt_tokens: int = 0) -> list[int]:
    """Token ids of ``record``'s prompt with ``templates`` (``prompt_templates(cfg.prompt, mode)``), the
    video placeholder expanded to ``num_video_tokens``; ``tags``, ``max_history_turns`` and
    ``max_prompt_tokens``: the recipe's ``data`` section. Raises PromptTooLong as training does."""
    return fit_prompt(tokenizer, record, profiles, templates, tags, num_video_tokens,
                      max_history_turns=max_history_turns, max_prompt_tokens=max_prompt_tokens).ids


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
