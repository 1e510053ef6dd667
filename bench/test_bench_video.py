"""Video decode throughput: frames per second for each backend on 360p and 720p clips, with and
without the disk cache.

    pytest bench/test_bench_video.py                  # ~1-2 minutes on 2 CPU cores
    pytest bench/test_bench_video.py --benchmark-json=video.json
    pytest bench/test_bench_video.py -m quick         # the two counting guards only

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

import json
import os

import pytest

from fastebm.config import VideoConfig
from fastebm.data.synth import write_synthetic_clip
from fastebm.data.video import decode, load_video_sample
from fastebm.data.video import dali_backend, decode_stats, reset_decode_stats

from conftest import bench_config, timing_threads

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


# ------------------------------------------------------------------------------------ guards --- #

GUARD_RECORDS = 8

@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, bench_cache):
    """Run the tiny trainer for two epochs; per epoch: (decode_stats(), clip paths used, one per prompt)."""
    from fastebm.data.records import resolve_video
    from fastebm.data.sample import write_sample_dataset
    from fastebm.train.trainer import Trainer

    d = tmp_path_factory.mktemp("bench_video_guard")
    paths = write_sample_dataset(str(bench_cache.sample))
    with open(paths["train"], encoding="utf-8") as f:
        records = json.load(f)[:GUARD_RECORDS]
    with open(d / "train.json", "w", encoding="utf-8") as f:
        json.dump(records, f)
    cfg = bench_config(f"run.output_dir={d / 'run'}", *bench_cache.overrides, "log.progress=false",
                       f"data.train={d / 'train.json'}", f"data.profiles={paths['profiles']}",
                       f"data.video_root={paths['video_root']}", f"video.cache_dir={d / 'cache'}",
                       "rollout.group_size=2", "rollout.max_new_tokens=4")
    t = Trainer(cfg)
    used: list[str] = []
    next_batch = t.next_batch

    def spy():
        batch = next_batch()
        used.extend(resolve_video(r, cfg.data.video_root) for r in batch.records)
        return batch

    t.next_batch = spy
    per = cfg.train.prompts_per_step
    steps = len(t.records) // per
    assert steps * per == len(t.records), (len(t.records), per)  # whole epochs of whole batches
    epochs = []
    try:
        with timing_threads():  # not timed, but one torch thread keeps a loaded 2-core machine moving
            for epoch in (1, 2):
                t.total_steps = epoch * steps  # this epoch's last step decodes nothing ahead
                used.clear()
                reset_decode_stats()
                for _ in range(steps):
                    t.train_step()
                epochs.append((decode_stats(), list(used)))
    finally:
        t.close()
    shape = (f"{len(t.records)} clips, {per} prompts/step, video.num_workers={cfg.video.num_workers}, "
             f"cache={'on' if cfg.video.cache_dir else 'off'}")
    return epochs, shape


@pytest.mark.quick
def test_guard_video_decodes_per_clip_per_step(guard, two_epochs):
    (stats, used), shape = two_epochs[0][0], two_epochs[1]
    assert sorted(set(used)) == sorted(used), "a clip was used twice in one epoch"
    decoded = stats["by_path"]
    assert set(decoded) <= set(used), f"decoded but never used: {sorted(set(decoded) - set(used))}"
    per_clip = [decoded.get(p, 0) for p in used]  # each clip is used by exactly one step of the epoch
    worst = max(per_clip, key=lambda n: abs(n - 1))
    guard.row("video_epoch1", "fastebm", shape, "clip_uses", len(used))
    guard.row("video_epoch1", "fastebm", shape, "decodes", stats["decodes"])
    print(f"\nepoch 1: {len(used)} clip uses, {stats['decodes']} decodes, {stats['cache_hits']} cache hits; "
          f"decodes per clip per step: min {min(per_clip)}, max {max(per_clip)}")
    guard.check("video_decodes_per_clip_per_step", float(worst), op="video_epoch1", provider="fastebm", shape=shape)


@pytest.mark.quick
def test_guard_video_cache_hits_second_epoch(guard, two_epochs):
    (stats, used), shape = two_epochs[0][1], two_epochs[1]
    guard.row("video_epoch2", "fastebm", shape, "clip_uses", len(used))
    guard.row("video_epoch2", "fastebm", shape, "cache_hits", stats["cache_hits"])
    guard.row("video_epoch2", "fastebm", shape, "decodes", stats["decodes"])
    print(f"\nepoch 2: {len(used)} clip uses, {stats['cache_hits']} cache hits, {stats['decodes']} decodes")
    guard.check("video_cache_hit_fraction_second_epoch", stats["cache_hits"] / len(used), op="video_epoch2",
                provider="fastebm", shape=shape)
