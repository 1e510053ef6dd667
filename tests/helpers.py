"""Shared builders for tests: tiny models (saved and loaded through the real loading code), clips, prompts."""
from __future__ import annotations

import os

import torch

from fastebm.config import VideoConfig

TINY_VIDEO = VideoConfig(fps=2.0, min_frames=4, max_frames=8, min_pixels=3136, max_pixels=12544)


def tiny_model(family: str, cache_dir: str):
    from fastebm.model.loading import load_model
    from fastebm.tiny import ensure_tiny_model

    return load_model(ensure_tiny_model(family, cache_dir), torch.device("cpu"))


def clip_sample(path: str, codec: str = "vp9", seed: int = 0, num_frames: int = 24, fps: float = 8.0,
                width: int = 96, height: int = 72, geometry=None):
    from fastebm.data.synth import write_synthetic_clip
    from fastebm.data.video import load_video_sample

    if not os.path.exists(path):
        write_synthetic_clip(path, codec=codec, width=width, height=height, num_frames=num_frames, fps=fps, seed=seed)
    return load_video_sample(path, TINY_VIDEO, **(geometry or {}))


def make_prompt(lm, video, record_index: int = 0, history: int = 0):
    from fastebm.data.prompts import build_messages, encode_prompt
    from fastebm.data.records import parse_record
    from fastebm.data.sample import make_records
    from fastebm.model.forward import Prompt

    rec = parse_record(make_records()[record_index], "sample.json", record_index)
    ids = encode_prompt(lm.tokenizer, build_messages(rec, "A profile.", max_history_turns=history),
                        video.num_video_tokens)
    return Prompt(ids, video)


def inputs_for(records, prompts, G):
    """RewardInputs of prompts (fastebm.model.forward.Prompt) with G completions each."""
    from fastebm.rewards import RewardInputs

    return RewardInputs(records=list(records), group_size=G, videos=[p.video for p in prompts],
                        prompt_ids=[p.ids for p in prompts])


def tiny_checkpointer(run_dir, tiny_path: str, keep: int = 0, lr: float = 1e-3):
    """A ``Checkpointer`` over the tiny policy (loaded through the real loading code), built as the
    trainers build it, after one optimizer step (so the optimizer has state to save)."""
    from fastebm.config import TrainConfig
    from fastebm.data.records import Profiles, RecordSampler
    from fastebm.model.loading import load_model
    from fastebm.train.builders import Checkpointer, SkipRecorder, build_optimizer, build_scheduler
    from fastebm.train.parallel import Dist

    lm = load_model(tiny_path, torch.device("cpu"), "float32")
    t = TrainConfig(lr=lr)
    opt = build_optimizer(lm.model, t)
    sched = build_scheduler(opt, t, 10)
    sum(p.float().square().sum() for p in list(lm.model.parameters())[:3]).backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    d = Dist()
    return Checkpointer(str(run_dir), lm, opt, sched, RecordSampler(7, 0), SkipRecorder(str(run_dir), d, lambda: 0),
                        Profiles(), d, keep=keep)
