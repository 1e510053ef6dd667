"""The bundled sample dataset: a few dozen EBM-format records with short synthetic clips.

``fastebm data sample OUT_DIR`` (and the tiny recipe, on first use) writes:

    OUT_DIR/train.json      records in the released EBM format (JSON array)
    OUT_DIR/cot.json        the same records with a ``process`` field (<vision>…</vision> <think>…</think>)
    OUT_DIR/profiles.json   {data_source: {character: profile}}; one character deliberately has none
    OUT_DIR/videos/*.mp4|*.webm   real encoded clips (H.264 and VP9, written with PyAV)

The dialogues are synthetic (a made-up film, "The Lantern Coast"); the format is the real one.
"""
from __future__ import annotations

import json
import os
import random

SOURCE = "The Lantern Coast"
CHARACTERS = {
    "Mira": "A lighthouse keeper's daughter, quick-witted and stubborn, who speaks in short, direct sentences.",
    "Tobin": "A nervous apprentice cartographer who hides his fear behind jokes and long explanations.",
    "Captain Vale": "A weathered smuggler, calm and sardonic, who never answers a question directly.",
    # "Old Wren" has no profile on purpose: the reader must fall back to the neutral default.
}
SPEAKERS = list(CHARACTERS) + ["Old Wren"]

OPENERS = [
    "Did you see the light move on the water?", "We should not be out here after the bell.",
    "The map says the cove is empty, but the map is old.", "Someone has been in the tower tonight.",
    "Keep your voice down, the tide carries every word.", "That boat has no flag and no lantern.",
    "If the storm turns, we lose the road back.", "You promised me you would not come alone.",
]
REPLIES = [
    "Then we watch and say nothing until it comes closer.", "I saw it, and I do not like what it means.",
    "The cove was never empty, it only looked that way.", "Stay behind me and do not touch the rope.",
    "If you are afraid, go home, but do not lie to me.", "We wait for the second signal, not the first.",
    "Nobody climbs the tower without a reason.", "Light the lamp and let them think we are asleep.",
    "I kept my promise, I brought the lantern and the key.", "The tide is turning, we have an hour at most.",
]
SCENES = [
    ("a red shape drifts slowly across a dark room", "the movement is slow and deliberate, someone is waiting"),
    ("a green shape moves quickly from left to right", "the quick motion suggests hurry and danger"),
    ("two coloured shapes circle each other on a blue background", "the circling feels like a standoff"),
    ("a bright square grows larger in the centre of the frame", "something is approaching us"),
    ("a yellow shape bounces near the edge of the frame", "it feels restless, as if trapped"),
    ("a shape fades in and out against a grey wall", "the flicker is like a signal from far away"),
]


def sample_corpus() -> list[str]:
    """Every sentence the sample records can contain (the tiny tokenizer is trained on these)."""
    out = [f"{s}: {line}" for s in SPEAKERS for line in OPENERS + REPLIES]
    out += [f"{s} {v} {t}" for v, t in SCENES for s in ("I see", "I think")]
    out += list(CHARACTERS.values()) + [SOURCE]
    return out


def make_records(n_records: int = 36, seed: int = 0, video_ext=("mp4", "webm")) -> list[dict]:
    """EBM-format record dicts (without writing videos); sessions hold 3 records each."""
    rng = random.Random(seed)
    records = []
    for i in range(n_records):
        session = i // 3
        assistant = SPEAKERS[session % len(SPEAKERS)]
        user = SPEAKERS[(session + 1) % len(SPEAKERS)]
        turns = []
        for k in range(rng.randint(1, 4)):
            turns.append({"speaker": user, "utterance": rng.choice(OPENERS)})
            turns.append({"speaker": assistant, "utterance": rng.choice(REPLIES)})
        turns.append({"speaker": user, "utterance": rng.choice(OPENERS)})
        answer = rng.choice(REPLIES)
        vision, think = SCENES[i % len(SCENES)]
        ext = video_ext[i % 2]
        records.append({
            "problem_id": i + 1,
            "session_id": f"sample{session:04d}",
            "user": user,
            "assistant": assistant,
            "data_type": "video",
            "data_source": SOURCE,
            "generation_type": "synthetic",
            "dialogue": turns,
            "target": {"speaker": assistant, "utterance": answer},
            "video_path": f"./videos/clip_{i:03d}.{ext}",
            "problem_type": "free-form",
            "solution": f"<answer>{answer}</answer>",
            "process": f"<vision>\nI see {vision}.\n</vision>\n\n<think>\nI think {think}.\n</think>",
        })
    return records


def write_sample_dataset(out_dir: str, n_records: int = 36, seed: int = 0, width: int = 160,
                         height: int = 120, seconds: float = 4.0, fps: int = 10) -> dict:
    """Write the sample dataset to ``out_dir`` (idempotent: a complete dataset is left as it is)."""
    from fastebm.data.synth import write_synthetic_clip

    marker = os.path.join(out_dir, ".complete")
    paths = {"train": os.path.join(out_dir, "train.json"), "cot": os.path.join(out_dir, "cot.json"),
             "profiles": os.path.join(out_dir, "profiles.json"), "video_root": out_dir}
    if os.path.isfile(marker):
        return paths
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    records = make_records(n_records, seed)
    for i, r in enumerate(records):
        path = os.path.join(out_dir, r["video_path"])
        codec = "h264" if path.endswith(".mp4") else "vp9"
        write_synthetic_clip(path, codec=codec, width=width, height=height,
                             num_frames=int(seconds * fps), fps=fps, seed=seed * 1000 + i)
    plain = [{k: v for k, v in r.items() if k != "process"} for r in records]
    for name, data in (("train", plain), ("cot", records), ("profiles", {SOURCE: CHARACTERS})):
        with open(paths[name], "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
    with open(marker, "w") as f:
        f.write("ok\n")
    return paths
