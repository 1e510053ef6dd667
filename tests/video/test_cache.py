"""Disk cache (second epoch decodes nothing), `data precompute`, and once-per-step decode counting."""
import argparse
import json
import shutil

import pytest
import torch

from fastebm.config import VideoConfig
from fastebm.data.synth import write_bad_video, write_synthetic_clip
from fastebm.data.video import (
    VideoCache, VideoError, clip_pixel_values, decode_stats, load_video_sample, reset_decode_stats, sampling_params,
)


def _same(a, b):
    assert torch.equal(a.pixel_values_videos, b.pixel_values_videos)
    assert torch.equal(a.video_grid_thw, b.video_grid_thw)
    assert torch.equal(a.clip_frames, b.clip_frames)
    assert a.second_per_grid_ts == b.second_per_grid_ts and a.num_video_tokens == b.num_video_tokens
    assert a.meta.frame_indices == b.meta.frame_indices and a.meta.clip_frame_indices == b.meta.clip_frame_indices


def test_second_epoch_decodes_nothing(clips, tmp_path):
    cfg = VideoConfig(backend="pyav", cache_dir=str(tmp_path / "cache"))
    names = ["vp9_odd", "h264", "vp9_odd_vfr"]
    reset_decode_stats()
    first = [load_video_sample(clips[n], cfg) for n in names]
    assert decode_stats()["decodes"] == 3 and decode_stats()["cache_hits"] == 0
    reset_decode_stats()
    second = [load_video_sample(clips[n], cfg) for n in names]
    st = decode_stats()
    assert st["decodes"] == 0 and st["cache_hits"] == 3
    for a, b in zip(first, second):
        _same(a, b)
        assert b.meta.backend == "pyav"
    uncached = load_video_sample(clips["h264"], VideoConfig(backend="pyav"))
    _same(uncached, second[1])  # bit-identical to a fresh decode


def test_cache_key_follows_content_and_params(clips, tmp_path):
    cfg = VideoConfig(backend="pyav", cache_dir=str(tmp_path / "cache"))
    load_video_sample(clips["vp9_small"], cfg)
    moved = str(tmp_path / "renamed.webm")
    shutil.copy(clips["vp9_small"], moved)
    reset_decode_stats()
    s = load_video_sample(moved, cfg)  # same bytes, other name: hit
    assert decode_stats()["cache_hits"] == 1 and s.meta.path == moved
    reset_decode_stats()
    load_video_sample(moved, VideoConfig(backend="pyav", cache_dir=cfg.cache_dir, fps=1.0))  # other params: miss
    load_video_sample(moved, VideoConfig(backend="pyav", cache_dir=cfg.cache_dir, max_pixels=64 * 784))
    assert decode_stats()["decodes"] == 2
    write_synthetic_clip(moved, codec="vp9", width=64, height=48, num_frames=24, fps=12, seed=99)  # new bytes
    reset_decode_stats()
    load_video_sample(moved, cfg)
    assert decode_stats()["decodes"] == 1
    p = sampling_params(cfg, 14, 2, 2)
    assert VideoCache(cfg.cache_dir).key(moved, p) != VideoCache(cfg.cache_dir).key(clips["vp9_small"], p)


def test_corrupt_cache_entry_is_redecoded(clips, tmp_path):
    cfg = VideoConfig(backend="pyav", cache_dir=str(tmp_path / "cache"))
    a = load_video_sample(clips["mjpeg"], cfg)
    entry = VideoCache(cfg.cache_dir).entry_path(clips["mjpeg"], sampling_params(cfg, 14, 2, 2))
    with open(entry, "wb") as f:
        f.write(b"garbage")
    reset_decode_stats()
    _same(a, load_video_sample(clips["mjpeg"], cfg))
    assert decode_stats()["decodes"] == 1


def test_cache_does_not_hide_a_missing_file(clips, tmp_path):
    cfg = VideoConfig(backend="pyav", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(VideoError, match="file not found"):
        load_video_sample(str(tmp_path / "gone.mp4"), cfg)


def test_each_clip_decoded_once_per_step(clips):
    """A step: one load per prompt; G rollouts, the policy/old/ref passes and the CLIP reward all
    use the same VideoSample, so decodes == clips whatever G and the number of passes."""
    reset_decode_stats()
    prompts = [clips["vp9_odd"], clips["h264"]]
    samples = {p: load_video_sample(p, VideoConfig(backend="pyav")) for p in prompts}
    G, passes = 4, 3
    for p, s in samples.items():
        for _ in range(G * passes):
            _ = s.pixel_values_videos.sum()  # policy input
        _ = clip_pixel_values(s.clip_frames)  # CLIP reward
    st = decode_stats()
    assert st["decodes"] == len(prompts)
    assert st["by_path"] == {p: 1 for p in prompts}


def test_precompute_fills_the_cache(tmp_path):
    from fastebm.cli.data import add_precompute_parser
    from fastebm.data import precompute

    vids = tmp_path / "data" / "videos"
    for i, codec in enumerate(["h264", "vp9"]):
        write_synthetic_clip(str(vids / f"c{i}.{'mp4' if codec == 'h264' else 'webm'}"), codec=codec, width=96,
                             height=64, num_frames=20, fps=10, seed=i)
    write_bad_video(str(vids / "bad.mp4"), "empty")
    rec = {"session_id": "s", "data_source": "Harry Potter", "user": "u", "assistant": "a",
           "dialogue": [], "target": {"speaker": "x", "utterance": "y"}}
    records = [dict(rec, problem_id=i, video_path=f"./videos/{v}")
               for i, v in enumerate(["c0.mp4", "c1.webm", "c0.mp4", "bad.mp4"])]
    rpath = tmp_path / "data" / "train.json"
    rpath.write_text(json.dumps(records))
    cache = str(tmp_path / "cache")
    parser = argparse.ArgumentParser()
    add_precompute_parser(parser.add_subparsers())
    skipped = tmp_path / "skipped.jsonl"
    args = parser.parse_args(["precompute", str(rpath), "--cache-dir", cache, "--workers", "0",
                              "--skipped", str(skipped), "--set", "video.backend='pyav'"])
    assert args.func(args) == 0
    lines = [json.loads(x) for x in skipped.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["video"].endswith("bad.mp4") and "empty" in lines[0]["reason"]
    reset_decode_stats()
    cfg = VideoConfig(backend="pyav", cache_dir=cache)
    for v in ["c0.mp4", "c1.webm"]:
        load_video_sample(str(vids / v), cfg)
    assert decode_stats()["decodes"] == 0 and decode_stats()["cache_hits"] == 2
    res = precompute.precompute(precompute.video_paths(str(rpath)), cfg, num_workers=0)
    assert res["decoded"] == 0 and res["cached"] == 2 and len(res["skipped"]) == 1
