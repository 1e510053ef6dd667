"""The prefetching loader: order, errors as items, timeouts that kill a worker, decode counts, cache."""
import os

import pytest
import torch

from fastebm.config import VideoConfig
from fastebm.data.synth import write_bad_video, write_synthetic_clip
from fastebm.data.video import VideoError, VideoSample, decode_stats, load_video_sample, reset_decode_stats
from fastebm.data.video.loader import VideoPrefetcher


def _release(path):
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.fixture
def mixed_paths(tmp_path):
    good = [write_synthetic_clip(str(tmp_path / f"g{i}.{ext}"), codec=codec, width=96, height=64, num_frames=20,
                                 fps=10, seed=i)
            for i, (codec, ext) in enumerate([("h264", "mp4"), ("vp9", "webm"), ("h264", "mp4")])]
    empty = write_bad_video(str(tmp_path / "empty.mp4"), "empty")
    hang = write_bad_video(str(tmp_path / "hang.mp4"), "hang")
    missing = str(tmp_path / "missing.mp4")
    paths = [good[0], empty, hang, good[1], missing, good[2]]
    yield paths, good
    _release(hang)


@pytest.mark.slow
@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_prefetcher_order_errors_and_timeout(mixed_paths, worker_type):
    paths, good = mixed_paths
    cfg = VideoConfig(backend="pyav", timeout_s=3.0)
    reset_decode_stats()
    with VideoPrefetcher(paths, cfg, num_workers=2, worker_type=worker_type) as pf:
        out = list(pf)
        restarts = pf.restarts
    assert [p for p, _ in out] == paths
    kinds = [type(x).__name__ for _, x in out]
    assert kinds == ["VideoSample", "VideoError", "VideoError", "VideoSample", "VideoError", "VideoSample"]
    reasons = {p: x.reason for p, x in out if isinstance(x, VideoError)}
    assert reasons[paths[1]].startswith("empty file")
    assert reasons[paths[2]] == "timed out after 3s"
    assert reasons[paths[4]] == "file not found"
    assert restarts == 1
    st = decode_stats()
    assert st["decodes"] == 3 and all(st["by_path"][g] == 1 for g in good)
    # Same tensors as a direct load
    for p, x in out:
        if isinstance(x, VideoSample):
            ref = load_video_sample(p, cfg)
            assert torch.equal(x.pixel_values_videos, ref.pixel_values_videos)
            assert torch.equal(x.video_grid_thw, ref.video_grid_thw)


def test_prefetcher_inline_and_endless_source(tmp_path):
    p = write_synthetic_clip(str(tmp_path / "a.webm"), codec="vp9", width=64, height=48, num_frames=12, fps=6)

    def endless():
        while True:
            yield p

    cfg = VideoConfig(backend="pyav")
    got = []
    for path, item in VideoPrefetcher(endless(), cfg, num_workers=0):
        got.append(item)
        if len(got) == 3:
            break
    assert all(isinstance(x, VideoSample) for x in got)
    pf = VideoPrefetcher(endless(), cfg, num_workers=1, worker_type="thread", depth=2)
    it = iter(pf)
    for _ in range(4):
        assert isinstance(next(it)[1], VideoSample)
    pf.close()


def test_thread_prefetcher_with_dali_backend(clips):
    from fastebm.data.video import dali_backend

    if not dali_backend.available():
        pytest.skip("nvidia-dali is not importable here")
    paths = [clips["vp9_odd"], clips["h264"], clips["vp9_small"]]
    reset_decode_stats()
    with VideoPrefetcher(paths, VideoConfig(backend="dali"), num_workers=2, worker_type="thread") as pf:
        out = list(pf)
    assert isinstance(out[0][1], VideoSample) and out[0][1].meta.backend == "dali"
    assert isinstance(out[1][1], VideoError) and "h264" in out[1][1].reason  # DALI-CPU refuses H.264
    assert isinstance(out[2][1], VideoSample)
    assert decode_stats()["decodes_dali"] == 2
