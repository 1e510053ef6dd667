"""Chat prompts: the one path every prompt is built through (SFT, GRPO rollout, the PCG teacher's
sequences, ``fastebm data show-prompt``, evaluation).

    templates = load_templates(cfg.prompt)                      # the [prompt] section; mode "ebm"
    fitted = fit_prompt(tokenizer, record, profiles, templates, cfg.data.tags, video.num_video_tokens,
                        max_history_turns=cfg.data.max_history_turns,
                        max_prompt_tokens=cfg.data.max_prompt_tokens)   # fitted.ids, fitted.messages
    print(show_chat(fitted.messages, video_line, tokenizer))   # what the policy gets, as text

The chat is ``[system, user]``: the system turn is the system template rendered; the user turn is
the video followed by the user template rendered. Templates are UTF-8 text files (one final newline
is dropped) with ``{placeholder}`` fields (``{{`` and ``}}`` for literal braces); an unknown
placeholder, a positional ``{}``, a format spec or a missing file is a DataError naming the file and
the placeholder. The placeholders (``PLACEHOLDERS``):

    {assistant_name}      the character the model plays (record ``assistant``)
    {assistant_profile}   its profile (fastebm.data.profiles: free text, or fields one per line)
    {user_name}           the character it talks with (record ``user``)
    {user_profile}        that character's profile
    {movie}               the record's ``data_source`` (after the profiles file's aliases)
    {dialogue}            the dialogue history, one ``speaker: utterance`` line per turn
    {perception_tag} {reasoning_tag} {answer_tag}     the names in ``data.tags`` (e.g. vision)

fastebm's own templates are ``fastebm/data/templates/ebm_system.txt`` and ``ebm_user.txt``
(``prompt.system_file`` / ``prompt.user_file`` empty). A mode is a pair of templates: ``MODES``
maps a mode name to the ``[prompt]`` fields naming its files and the files shipped for it; training
uses ``"ebm"``.

Length: with ``max_prompt_tokens`` the oldest dialogue turns are dropped until the prompt (video
tokens included) fits; the video, the profiles and the instructions are never cut. A prompt that
does not fit with no history at all raises ``PromptTooLong`` (the callers skip the record with the
reason). The text is rendered by the model's own chat template and the single ``<|video_pad|>`` is
expanded to the clip's number of video tokens, exactly as Qwen2-VL's processor does.
"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass
from typing import Optional, Sequence

from fastebm.data import DataError
from fastebm.data.profiles import Profiles, render_profile
from fastebm.data.records import Record, Turn

# Qwen2-VL's special tokens (names as in the released tokenizers).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
VIDEO_PAD = "<|video_pad|>"

# Qwen2-VL's chat template, reduced to what fastebm renders (system + user with a video + assistant).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PLACEHOLDERS = {
    "assistant_name": "the character the model plays (record 'assistant')",
    "assistant_profile": "the assistant's profile (free text, or its fields one per line)",
    "user_name": "the character the model talks with (record 'user')",
    "user_profile": "the user's profile",
    "movie": "the record's data_source (after the profiles file's aliases)",
    "dialogue": "the dialogue history, one 'speaker: utterance' line per turn",
    "perception_tag": "the first name of data.tags (e.g. vision)",
    "reasoning_tag": "the second name of data.tags (e.g. think)",
    "answer_tag": "the third name of data.tags (e.g. answer)",
}
"""Every placeholder a system or user template may use."""

PROFILE_FIELD_PLACEHOLDERS = {"label": "the field name, title-cased", "value": "the field's text"}

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

MODES = {"ebm": (("system_file", "ebm_system.txt"), ("user_file", "ebm_user.txt")),
         "cot": (("cot_system_file", "cot_system.txt"), ("cot_user_file", "cot_user.txt")),
         "vanilla": (("vanilla_system_file", "vanilla_system.txt"), ("vanilla_user_file", "vanilla_user.txt"))}
"""Prompt mode -> ((the [prompt] field naming its system template, the shipped default),
(the same for its user template)). Training uses "ebm" (the tagged vision / think / answer output);
``fastebm generate --prompt-mode`` also "cot" (think, then answer) and "vanilla" (the line only)."""


class PromptTooLong(DataError):
    """A record whose prompt exceeds data.max_prompt_tokens with no dialogue history left."""


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A checked template: its text, the file it came from, and the placeholders it uses."""
    text: str
    source: str
    fields: tuple[str, ...]

    def render(self, values: dict) -> str:
        return self.text.format_map(values)


def parse_template(text: str, source: str, allowed=PLACEHOLDERS, key: str = "") -> Template:
    """Check a template's ``{placeholders}`` against ``allowed``; errors name ``source`` (the file, or
    the config key) and the placeholder."""
    where = f"{source}" + (f" ({key})" if key else "")
    names = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:  # a lone '{' or '}'
        raise DataError(f"{where}: not a valid template: {e} (write {{{{ and }}}} for literal braces)") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise DataError(f"{where}: a positional placeholder {{{name}}}: name it, one of {sorted(allowed)}")
        if name not in allowed:
            raise DataError(f"{where}: unknown placeholder {{{name}}}; the placeholders are: {', '.join(allowed)} "
                            f"(write {{{{ and }}}} for literal braces)")
        if spec or conv:
            raise DataError(f"{where}: placeholder {{{name}}} has a format spec or conversion; write plain {{{name}}}")
        names.append(name)
    return Template(text, source, tuple(dict.fromkeys(names)))


def read_template(path: str, allowed=PLACEHOLDERS, key: str = "") -> Template:
    """A template file (UTF-8; one final newline dropped), checked."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: template file not found" + (f" ({key})" if key else ""))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return parse_template(text, path, allowed, key)


@dataclass(frozen=True)
class PromptTemplates:
    """The ``[prompt]`` section, loaded and checked: what ``build_chat`` renders with."""
    system: Template
    user: Template
    profile_field: Template
    list_separator: str = ", "
    missing_profile: str = Profiles.NEUTRAL
    mode: str = "ebm"


def template_paths(prompt_cfg, mode: str = "ebm") -> tuple[str, str]:
    """The system and user template files of ``mode``: the configured ones, else the shipped defaults."""
    if mode not in MODES:
        raise DataError(f"prompt mode {mode!r}: unknown; the modes are {sorted(MODES)}")
    return tuple(os.path.expanduser(getattr(prompt_cfg, key, "") or "") or os.path.join(TEMPLATE_DIR, default)
                 for key, default in MODES[mode])


def load_templates(prompt_cfg=None, mode: str = "ebm") -> PromptTemplates:
    """The templates of ``mode`` from the ``[prompt]`` section (``None``: the defaults), every one checked."""
    from fastebm.config import PromptConfig

    p = prompt_cfg if prompt_cfg is not None else PromptConfig()
    (sys_key, _), (user_key, _) = MODES.get(mode, ((None, None), (None, None)))
    system_path, user_path = template_paths(p, mode)
    return PromptTemplates(
        system=read_template(system_path, key=f"prompt.{sys_key}"),
        user=read_template(user_path, key=f"prompt.{user_key}"),
        profile_field=parse_template(p.profile_field, "prompt.profile_field", PROFILE_FIELD_PLACEHOLDERS),
        list_separator=p.list_separator, missing_profile=p.missing_profile, mode=mode)


DEFAULT_TEMPLATES: Optional[PromptTemplates] = None


def default_templates() -> PromptTemplates:
    global DEFAULT_TEMPLATES
    if DEFAULT_TEMPLATES is None:
        DEFAULT_TEMPLATES = load_templates()
    return DEFAULT_TEMPLATES


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def format_dialogue(turns: Sequence[Turn]) -> str:
    return "\n".join(f"{t.speaker}: {t.utterance}" for t in turns)


def history(record: Record, max_history_turns: int = 0) -> list[Turn]:
    """The dialogue turns before the target line, at most ``max_history_turns`` of them (0: all)."""
    return list(record.dialogue[-max_history_turns:] if max_history_turns > 0 else record.dialogue)


def prompt_values(record: Record, profiles: Optional[Profiles], templates: PromptTemplates,
                  tags: Sequence[str] = ("vision", "think", "answer")) -> dict:
    """Every placeholder's value but ``dialogue``. Looks each speaker's profile up once (a miss is
    counted in ``profiles.missing``, once per prompt built)."""
    profiles = profiles if profiles is not None else Profiles()
    used = set(templates.system.fields) | set(templates.user.fields)

    def profile(name: str, key: str) -> str:
        if key not in used:  # a template without this profile neither looks it up nor counts a miss
            return ""
        return render_profile(profiles.find(record.data_source, name), templates.profile_field.text,
                              templates.list_separator, templates.missing_profile)

    v, t, a = tags
    return {"assistant_name": record.assistant, "assistant_profile": profile(record.assistant, "assistant_profile"),
            "user_name": record.user, "user_profile": profile(record.user, "user_profile"),
            "movie": profiles.movie(record.data_source), "perception_tag": v, "reasoning_tag": t, "answer_tag": a}


def chat_messages(values: dict, templates: PromptTemplates, turns: Sequence[Turn]) -> list[dict]:
    """``[system, user]`` with ``turns`` as the dialogue history."""
    values = {**values, "dialogue": format_dialogue(turns)}
    return [
        {"role": "system", "content": templates.system.render(values)},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": templates.user.render(values)}]},
    ]


def build_chat(record: Record, profiles: Optional[Profiles], templates: Optional[PromptTemplates] = None,
               tags: Sequence[str] = ("vision", "think", "answer"), max_history_turns: int = 0) -> list[dict]:
    """The chat for one record (no length limit: ``fit_prompt`` applies ``data.max_prompt_tokens``)."""
    templates = templates or default_templates()
    return chat_messages(prompt_values(record, profiles, templates, tags), templates, history(record, max_history_turns))


def build_messages(record: Record, profile: str, tags: Sequence[str] = ("vision", "think", "answer"),
                   max_history_turns: int = 0, templates: Optional[PromptTemplates] = None,
                   user_profile: Optional[str] = None) -> list[dict]:
    """The chat of a record with the assistant's profile text given directly (tests, quick use)."""
    templates = templates or default_templates()
    v, t, a = tags
    values = {"assistant_name": record.assistant, "assistant_profile": profile, "user_name": record.user,
              "user_profile": templates.missing_profile if user_profile is None else user_profile,
              "movie": record.data_source, "perception_tag": v, "reasoning_tag": t, "answer_tag": a}
    return chat_messages(values, templates, history(record, max_history_turns))


def encode_prompt(tokenizer, messages: list[dict], num_video_tokens: int) -> list[int]:
    """Token ids of the rendered chat prompt (generation prompt included), video pad expanded."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pieces = text.split(VIDEO_PAD)
    if len(pieces) != 2:
        raise ValueError(f"the chat template rendered {len(pieces) - 1} video placeholders, expected 1")
    pad_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    before = tokenizer(pieces[0], add_special_tokens=False)["input_ids"]
    after = tokenizer(pieces[1], add_special_tokens=False)["input_ids"]
    return before + [pad_id] * num_video_tokens + after


@dataclass
class FittedPrompt:
    """A record's prompt after the length limit: token ids, the chat, and the history turns kept / dropped."""
    ids: list[int]
    messages: list[dict]
    turns_kept: int
    turns_dropped: int


def fit_prompt(tokenizer, record: Record, profiles: Optional[Profiles], templates: Optional[PromptTemplates],
               tags: Sequence[str], num_video_tokens: int, *, max_history_turns: int = 0,
               max_prompt_tokens: int = 0) -> FittedPrompt:
    """The record's prompt ids within ``max_prompt_tokens`` (0: no limit), dropping the oldest dialogue
    turns first. Raises PromptTooLong (naming the record and the lengths) when even no history is too long.

    One encode when the prompt fits; otherwise a binary search over the number of turns kept (the
    length grows with every turn kept), about log2(turns) encodes more.
    """
    templates = templates or default_templates()
    values = prompt_values(record, profiles, templates, tags)
    turns = history(record, max_history_turns)

    def encode(k: int) -> tuple[list[int], list[dict]]:
        msgs = chat_messages(values, templates, turns[len(turns) - k:])
        return encode_prompt(tokenizer, msgs, num_video_tokens), msgs

    ids, msgs = encode(len(turns))
    if max_prompt_tokens <= 0 or len(ids) <= max_prompt_tokens:
        return FittedPrompt(ids, msgs, len(turns), len(record.dialogue) - len(turns))
    full = len(ids)
    ids, msgs = encode(0)
    if len(ids) > max_prompt_tokens:
        raise PromptTooLong(
            f"{record.where}: the prompt has {len(ids)} tokens ({num_video_tokens} of them video) with no dialogue "
            f"history ({full} with all {len(turns)} turns), over data.max_prompt_tokens = {max_prompt_tokens}: "
            f"the video, the profiles and the instructions are never cut (fewer frames or pixels, or a larger limit)")
    lo, hi, best = 0, len(turns) - 1, (ids, msgs, 0)   # k = lo fits; k = len(turns) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cand, cmsgs = encode(mid)
        if len(cand) <= max_prompt_tokens:
            lo, best = mid, (cand, cmsgs, mid)
        else:
            hi = mid - 1
    ids, msgs, k = best
    return FittedPrompt(ids, msgs, k, len(record.dialogue) - k)


def sft_target(record: Record) -> str:
    """The CoT-SFT assistant text: the ``process`` (vision + think) followed by the ``solution``."""
    if not record.process:
        raise ValueError(f"{record.where}: field 'process' is missing (SFT needs CoT records)")
    return f"{record.process.strip()}\n\n{record.solution.strip()}"


# ----------------------------------------------------------------------------------------------
# Showing a prompt (fastebm data show-prompt)
# ----------------------------------------------------------------------------------------------


def render_chat_text(messages: list[dict]) -> str:
    """``CHAT_TEMPLATE`` rendered (generation prompt included), for when no tokenizer is at hand."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            body = m["content"]
        else:
            parts = {"video": f"<|vision_start|>{VIDEO_PAD}<|vision_end|>",
                     "image": "<|vision_start|><|image_pad|><|vision_end|>"}
            body = "".join(parts.get(c["type"], c.get("text", "")) for c in m["content"])
        out.append(f"<|im_start|>{m['role']}\n{body}<|im_end|>\n")
    return "".join(out) + "<|im_start|>assistant\n"


def show_chat(messages: list[dict], video_line: str, tokenizer=None) -> str:
    """The chat exactly as the model's chat template renders it, with the video's token run shown as
    ``video_line`` (one line). Without a tokenizer, fastebm's ``CHAT_TEMPLATE`` (Qwen2-VL's, reduced)."""
    if tokenizer is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = render_chat_text(messages)
    return text.replace(VIDEO_PAD, video_line, 1)
