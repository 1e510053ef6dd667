"""Chat prompts: the role-play instruction, the character profile, the dialogue and the video.

The system turn names the character, the movie, the profile and the output format with the
configured tags; the user turn carries the video and the dialogue history. The text is rendered by
the model's own chat template and the single ``<|video_pad|>`` is expanded to the clip's number of
video tokens, exactly as Qwen2-VL's processor does.
"""
from __future__ import annotations

from typing import Sequence

from fastebm.data.records import Record

# Qwen2-VL's special tokens (names as in the released tokenizers).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

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


SYSTEM_TEMPLATE = (
    "You are {assistant} from {data_source}, talking with {user}.\n"
    "Character profile: {profile}\n"
    "Watch the video as {assistant} sees the scene, then reply in character in exactly this format:\n"
    "<{v}> what you see in the scene </{v}>\n<{t}> what you make of it </{t}>\n<{a}> your next line </{a}>"
)
USER_TEMPLATE = "The dialogue so far:\n{history}\nNow reply as {assistant}."


def build_messages(record: Record, profile: str, tags: Sequence[str] = ("vision", "think", "answer"),
                   max_history_turns: int = 0) -> list[dict]:
    v, t, a = tags
    turns = record.dialogue[-max_history_turns:] if max_history_turns > 0 else record.dialogue
    history = "\n".join(f"{turn.speaker}: {turn.utterance}" for turn in turns) or "(the scene opens)"
    system = SYSTEM_TEMPLATE.format(assistant=record.assistant, data_source=record.data_source,
                                    user=record.user, profile=profile, v=v, t=t, a=a)
    user = USER_TEMPLATE.format(history=history, assistant=record.assistant)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": user}]},
    ]


def encode_prompt(tokenizer, messages: list[dict], num_video_tokens: int) -> list[int]:
    """Token ids of the rendered chat prompt (generation prompt included), video pad expanded."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pad = "<|video_pad|>"
    pieces = text.split(pad)
    if len(pieces) != 2:
        raise ValueError(f"the chat template rendered {len(pieces) - 1} video placeholders, expected 1")
    pad_id = tokenizer.convert_tokens_to_ids(pad)
    before = tokenizer(pieces[0], add_special_tokens=False)["input_ids"]
    after = tokenizer(pieces[1], add_special_tokens=False)["input_ids"]
    return before + [pad_id] * num_video_tokens + after


def sft_target(record: Record) -> str:
    """The CoT-SFT assistant text: the ``process`` (vision + think) followed by the ``solution``."""
    if not record.process:
        raise ValueError(f"{record.where}: field 'process' is missing (SFT needs CoT records)")
    return f"{record.process.strip()}\n\n{record.solution.strip()}"
