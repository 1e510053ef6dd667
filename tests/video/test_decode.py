"""decode / load_video_sample on real encoded clips: indices, timestamps, pixels, HF processor parity."""
import numpy as np
import pytest
import torch

from fastebm.config import VideoConfig
from fastebm.data.synth import read_frame_code, vfr_timestamps
from fastebm.data.video import (
    VideoError, clip_pixel_values, decode, decode_stats, load_video_sample, probe, reset_decode_stats,
)


def codes(frames):
    return [read_frame_code(f) for f in frames.cpu().numpy()]


@pytest.mark.parametrize("name", ["vp9_odd", "vp9_odd_vfr", "h264", "h264_vfr", "mjpeg"])
def test_pyav_decode_returns_the_asked_frames(clips, name):
    d = decode(clips[name], fps=2.0, backend="pyav")
    assert d.frames.dtype == torch.uint8 and d.frames.shape[1:] == (d.meta.height, d.meta.width, 3)
    assert codes(d.frames) == d.meta.frame_indices
    assert d.meta.backend == "pyav" and len(d.meta.frame_indices) % 2 == 0
    every = decode(clips[name], backend="pyav")
    assert codes(every.frames) == list(range(every.meta.num_frames))
    some = decode(clips[name], num_frames=5, backend="pyav")
    assert codes(some.frames) == some.meta.frame_indices and len(some.meta.frame_indices) == 5


def test_probe_counts_frames_and_times_of_vfr_clip(clips):
    info = probe(clips["vp9_odd_vfr"])
    assert (info.codec, info.width, info.height, info.num_frames) == ("vp9", 317, 241, 40)
    assert info.timestamps == pytest.approx(vfr_timestamps(40, 8.0, seed=1), abs=1e-6)
    assert info.fps == pytest.approx(info.num_frames / info.duration)


def test_seeking_decode_of_a_long_clip(tmp_path):
    from fastebm.data.synth import write_synthetic_clip

    p = write_synthetic_clip(str(tmp_path / "long.mp4"), codec="h264", width=64, height=48, num_frames=200,
                             fps=25, gop=10)
    idx = [199, 0, 57, 58, 120, 120, 3]
    d = decode(p, backend="pyav")  # all frames, sequential
    assert codes(d.frames) == list(range(200))
    from fastebm.data.video.pyav_backend import decode_frames

    sparse = decode_frames(p, probe(p), idx)
    assert codes(sparse) == idx
    assert torch.equal(sparse, d.frames[idx])


@pytest.mark.parametrize("name", ["vp9_odd", "h264"])
def test_pixel_values_match_transformers_video_processor(clips, name):
    """PyAV path: bit-identical to Qwen2VLVideoProcessor on the same frames and pixel limits."""
    from transformers import Qwen2VLVideoProcessor

    cfg = VideoConfig(backend="pyav", min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28)
    s = load_video_sample(clips[name], cfg)
    frames = decode(clips[name], backend="pyav").frames[s.meta.frame_indices]
    proc = Qwen2VLVideoProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    ref = proc(videos=[frames.numpy()], do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt")
    assert torch.equal(s.video_grid_thw, ref["video_grid_thw"])
    assert s.pixel_values_videos.shape == ref["pixel_values_videos"].shape
    assert s.pixel_values_videos.dtype == torch.float32
    torch.testing.assert_close(s.pixel_values_videos, ref["pixel_values_videos"], atol=1e-5, rtol=0)
    assert s.num_video_tokens == int(ref["video_grid_thw"].prod()) // 4


def test_sample_fields(clips):
    cfg = VideoConfig(backend="pyav")
    s = load_video_sample(clips["vp9_odd"], cfg)  # 40 frames at 8 fps: 5 s
    m = s.meta
    assert len(m.frame_indices) == 10 and s.video_grid_thw[0, 0] == 5
    assert m.sample_fps == pytest.approx(2.0) and s.second_per_grid_ts == pytest.approx(1.0)
    assert m.clip_frame_indices == np.linspace(0, 39, 8, dtype=int).tolist()  # 5 s -> 8 CLIP frames
    assert s.clip_frames.shape == (8, 224, 224, 3) and s.clip_frames.dtype == torch.uint8
    assert s.video_grid_thw.dtype == torch.int64 and s.video_grid_thw.shape == (1, 3)
    h, w = s.frames.shape[1:3]
    assert h % 28 == 0 and w % 28 == 0 and 4 * 784 <= h * w <= 128 * 784
    px = clip_pixel_values(s.clip_frames)
    assert px.shape == (8, 3, 224, 224) and px.dtype == torch.float32


def test_clip_frames_match_transformers_clip_processor(clips):
    from transformers import CLIPImageProcessor

    s = load_video_sample(clips["vp9_odd"], VideoConfig(backend="pyav"))
    frames = decode(clips["vp9_odd"], backend="pyav").frames[s.meta.clip_frame_indices]
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ref = proc(images=list(frames.numpy()), return_tensors="pt")["pixel_values"]
    ours = clip_pixel_values(s.clip_frames)
    # torchvision's centre crop rounds the offset where ours floors it: at most one pixel of shift
    assert (ours - ref).abs().mean() < 0.05


def test_one_decode_serves_policy_and_clip_frames(clips):
    reset_decode_stats()
    s = load_video_sample(clips["vp9_odd_vfr"], VideoConfig(backend="pyav"))
    st = decode_stats()
    assert st["decodes"] == 1 and st["by_path"] == {clips["vp9_odd_vfr"]: 1}
    assert s.meta.frame_indices and s.meta.clip_frame_indices


def test_decode_error_names_file_and_reason(tmp_path):
    with pytest.raises(VideoError) as e:
        decode(str(tmp_path / "nope.mp4"))
    assert e.value.path.endswith("nope.mp4") and e.value.reason == "file not found"
    assert "nope.mp4" in str(e.value) and "file not found" in str(e.value)
