"""Shared tiny models and inputs for the reward tests: built once per session, loaded through the real code."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/helpers.py

from helpers import clip_sample, make_prompt, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "models")


@pytest.fixture(scope="session")
def teacher(model_dir):
    return tiny_model("qwen2vl", model_dir)


@pytest.fixture(scope="session")
def videos(teacher, tmp_path_factory):
    d = tmp_path_factory.mktemp("reward_clips")
    v = teacher.model.config.vision_config
    g = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
    return [clip_sample(str(d / "a.webm"), "vp9", seed=1, geometry=g),
            clip_sample(str(d / "b.webm"), "vp9", seed=2, num_frames=40, geometry=g)]


@pytest.fixture(scope="session")
def records():
    from fastebm.data.records import parse_record
    from fastebm.data.sample import make_records

    return [parse_record(r, "sample.json", i) for i, r in enumerate(make_records()[:2])]


@pytest.fixture(scope="session")
def prompts(teacher, videos):
    return [make_prompt(teacher, videos[0], 0, history=1), make_prompt(teacher, videos[1], 1)]


class Counter:
    """Wraps a module's forward (or any method) and counts calls."""

    def __init__(self, obj, name="forward"):
        self.obj, self.name, self.calls = obj, name, 0
        self.orig = getattr(obj, name)

        def wrapped(*a, **k):
            self.calls += 1
            return self.orig(*a, **k)
        setattr(obj, name, wrapped)

    def restore(self):
        setattr(self.obj, self.name, self.orig)


@pytest.fixture
def count():
    made = []

    def make(obj, name="forward"):
        c = Counter(obj, name)
        made.append(c)
        return c
    yield make
    for c in made:
        c.restore()


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
