"""fastebm eval auto (in-process): every metric equals the reward code called directly on the same
predictions (PCG under the teacher, CLIP on the clips), per data_source and overall; distinct-n;
a prediction whose video fails is left out and listed."""
import json
import math
import os

import pytest
import torch

from fastebm.data.prompts import build_messages, encode_prompt
from fastebm.data.records import parse_record
from fastebm.data.video import load_video_sample
from fastebm.eval.auto import auto_metrics
from fastebm.eval.extract import lenient_answer
from fastebm.eval.generate import read_jsonl, video_geometry
from fastebm.eval.stats import distinct_n
from fastebm.model.loading import load_model
from fastebm.rewards import RewardContext, RewardInputs, build_rewards
from fastebm.rewards.format import format_reward

OUTPUTS = [
    "<vision>a red shape drifts across a dark room</vision>\n<think>someone waits</think>\n"
    "<answer>Stay behind me.</answer>",
    "<vision>two shapes circle</vision> <think>a standoff</think> <answer>We wait for the second signal",
    "I kept my promise, I brought the lantern.",
    "<vision>a green shape</vision><think>hurry</think><answer>Light the lamp and wait.</answer>",
    "<answer></answer>",
]


@pytest.fixture(scope="module")
def crafted(preds, tmp_path_factory):
    rows = read_jsonl(preds)
    rows.append(dict(rows[0], id="99", video=str(tmp_path_factory.getbasetemp() / "no_such_clip.mp4")))
    for r, text in zip(rows, OUTPUTS):
        r["raw_output"] = text
    for r in rows[2:4]:
        r["record"] = dict(r["record"], data_source="Another Film")
    path = tmp_path_factory.mktemp("auto") / "crafted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


@pytest.mark.slow
def test_auto_metrics_equal_the_rewards_called_directly(crafted, tiny_cfg, tmp_path):
    path, rows = crafted
    cfg = tiny_cfg()
    out = str(tmp_path / "auto")
    res = auto_metrics(cfg, path, out, progress=False)
    assert res["rewards"] == ["accuracy", "clip", "pcg"]
    assert [s["id"] for s in res["skipped"]] == ["99"] and "file not found" in res["skipped"][0]["reason"]
    kept = rows[:4]

    # the same rewards, built and called here on one batch of the kept predictions
    teacher = load_model(res["teacher"], torch.device("cpu"), trainable=False)
    g = video_geometry(teacher.model)
    records = [parse_record(r["record"], path, i) for i, r in enumerate(kept)]
    videos = [load_video_sample(r["video"], cfg.video, **g) for r in kept]
    prompt_ids = [encode_prompt(teacher.tokenizer, build_messages(rec, r["profiles"]["assistant"], cfg.data.tags,
                                                                  cfg.data.max_history_turns,
                                                                  user_profile=r["profiles"]["user"]),
                                v.num_video_tokens)
                  for rec, r, v in zip(records, kept, videos)]
    rewards = build_rewards(["accuracy", "clip", "pcg"], cfg.rewards,
                            RewardContext(tags=tuple(cfg.data.tags), reference=teacher,
                                          tiny_cache_dir=cfg.model.tiny_cache_dir, shared_prefix=True))
    inputs = RewardInputs(records=records, group_size=1, videos=videos, prompt_ids=prompt_ids)
    texts = [r["raw_output"] for r in kept]
    answers = [lenient_answer(t)[0] or "" for t in texts]
    direct = {"accuracy": rewards["accuracy"]([f"<answer>{a}</answer>" for a in answers], inputs),
              "clip": rewards["clip"](texts, inputs), "pcg": rewards["pcg"](texts, inputs),
              "format": [format_reward(t) for t in texts],
              "format_strict": [float(format_reward(t) == 5.0) for t in texts],
              "answer_words": [float(len(a.split())) for a in answers]}
    assert direct["pcg"][0] != 0 and direct["clip"][0] != 0 and direct["pcg"][2] == 0  # the test has teeth

    groups = {"overall": [0, 1, 2, 3], "The Lantern Coast": [0, 1], "Another Film": [2, 3]}
    for name, ids in groups.items():
        got = res["overall"] if name == "overall" else res["by_data_source"][name]
        assert got["n"] == len(ids)
        for k, vals in direct.items():
            assert got[k] == pytest.approx(sum(vals[i] for i in ids) / len(ids), abs=1e-4), (name, k)
        assert got["distinct_1"] == distinct_n([answers[i] for i in ids], 1)
        assert got["distinct_2"] == distinct_n([answers[i] for i in ids], 2)
    assert res["overall"]["format_strict"] == 0.5 and res["by_data_source"]["Another Film"]["format_strict"] == 0.5
    md = open(os.path.join(out, "metrics.md")).read()
    assert "| overall | 4 |" in md and "Another Film" in md and "1 predictions skipped" in md
    assert json.load(open(os.path.join(out, "metrics.json"))) == json.loads(json.dumps(res))


def test_distinct_n():
    assert distinct_n(["a b a b", "a b"], 1) == 2 / 6
    assert distinct_n(["a b a b", "A B"], 2) == 2 / 4   # lower-cased: (a b) (b a) (a b) (a b)
    assert distinct_n(["one"], 2) is None
    assert math.isclose(distinct_n(["x y z"], 3), 1.0)
