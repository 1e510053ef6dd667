"""Video decode throughput: frames per second for each backend on 360p and 720p clips, with and
without the disk cache.

    pytest bench/test_bench_video.py                  # ~1-2 minutes on 2 CPU cores
    pytest bench/test_bench_video.py --benchmark-json=video.json

Clips are made here (fastebm.data.synth): 4 s at 30 fps (120 frames) of moving shapes, 640x360
and 1280x720, VP9 in WebM and H.264 in MP4. Numbers in each result's ``extra_info``:

- ``decode_all``: every frame decoded to RGB, ``frames_per_s`` = 120 / time (raw decoder speed,
  the number ``video.backend = "auto"`` is chosen by on the CPU).
- ``load_sample``: ``load_video_sample`` with the default VideoConfig (2 fps, 4-16 frames, 128x28x28
  pixels, CLIP 224): one decode for the policy and CLIP frames, resize, normalise, patchify;
  ``source_frames_per_s`` = 120 / time, ``clips_per_s`` = 1 / time. ``cached`` reads the entry
  that an earlier call wrote (content hash + load + normalise + patchify; no decode).

DALI here is DALI's CPU decoder (VP9 only: it refuses H.264 on the CPU). The GPU path
(``device="mixed"``, NVDEC) cannot be run in this workplace: no GPU in the dev machines and no DALI
on the lent GPU machine. See docs/video.md for the recorded numbers.
"""
from __future__ import annotations

import os

import pytest

from fastebm.config import VideoConfig
from fastebm.data.synth import write_synthetic_clip
from fastebm.data.video import decode, load_video_sample
from fastebm.data.video import dali_backend

FRAMES, FPS = 120, 30
SIZES = {"360p": (640, 360), "720p": (1280, 720)}
CASES = [("pyav", "vp9"), ("dali", "vp9"), ("pyav", "h264")]


@pytest.fixture(scope="module")
def bench_clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_clips")
    out = {}
    for res, (w, h) in SIZES.items():
        for codec, ext in (("vp9", "webm"), ("h264", "mp4")):
            out[(res, codec)] = write_synthetic_clip(str(d / f"{res}.{ext}"), codec=codec, width=w, height=h,
                                                     num_frames=FRAMES, fps=FPS, gop=60, seed=1)
    return out


def _skip_unavailable(backend):
    if backend == "dali" and not dali_backend.available():
        pytest.skip("nvidia-dali is not importable here")


def _info(benchmark, **kw):
    benchmark.extra_info.update(kw, device=f"cpu ({os.cpu_count()} cores)")


@pytest.mark.parametrize("res", list(SIZES))
@pytest.mark.parametrize("backend,codec", CASES)
def test_decode_all(benchmark, bench_clips, backend, codec, res):
    _skip_unavailable(backend)
    path = bench_clips[(res, codec)]
    out = benchmark.pedantic(lambda: decode(path, backend=backend), rounds=3, iterations=1, warmup_rounds=1)
    assert out.frames.shape[0] == FRAMES
    _info(benchmark, backend=backend, codec=codec, res=res, frames_per_s=FRAMES / benchmark.stats["mean"])


@pytest.mark.parametrize("cached", [False, True], ids=["nocache", "cache"])
@pytest.mark.parametrize("res", list(SIZES))
@pytest.mark.parametrize("backend,codec", CASES)
def test_load_sample(benchmark, bench_clips, tmp_path, backend, codec, res, cached):
    _skip_unavailable(backend)
    path = bench_clips[(res, codec)]
    cfg = VideoConfig(backend=backend, cache_dir=str(tmp_path / "cache") if cached else "")
    if cached:
        load_video_sample(path, cfg)  # fill the entry
    s = benchmark.pedantic(lambda: load_video_sample(path, cfg), rounds=3, iterations=1, warmup_rounds=1)
    assert s.meta.backend == backend
    t = benchmark.stats["mean"]
    _info(benchmark, backend=backend, codec=codec, res=res, cached=cached, source_frames_per_s=FRAMES / t,
          clips_per_s=1 / t, policy_frames=len(s.meta.frame_indices), clip_frames=len(s.meta.clip_frame_indices))
