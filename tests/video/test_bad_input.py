"""Every bad input yields a VideoError naming the file and the reason; a hang becomes a timeout."""
import os
import time

import pytest

from fastebm.config import VideoConfig
from fastebm.data.synth import BAD_KINDS, BAD_REASONS, write_bad_video, write_synthetic_clip
from fastebm.data.video import VideoError, decode, load_video_sample


def _release(path):
    """Unblock a reader stuck on a FIFO (open for writing, close: the reader sees end of file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_each_bad_kind_raises_named_error(tmp_path, kind, backend):
    path = write_bad_video(str(tmp_path / f"{kind}.webm"), kind)
    cfg = VideoConfig(backend=backend, timeout_s=1.0)
    try:
        with pytest.raises(VideoError) as e:
            load_video_sample(path, cfg)
    finally:
        if kind == "hang":
            _release(path)
    assert e.value.path == path
    assert BAD_REASONS[kind] in e.value.reason, e.value.reason
    assert path in str(e.value) and e.value.reason in str(e.value)


def test_bad_input_under_dali_backend(tmp_path):
    for kind in ("empty", "truncated", "not_video", "too_few_frames", "absurd_dims"):
        path = write_bad_video(str(tmp_path / f"{kind}.webm"), kind)
        with pytest.raises(VideoError) as e:
            load_video_sample(path, VideoConfig(backend="dali"))
        assert BAD_REASONS[kind] in e.value.reason


def test_hang_times_out_and_later_decodes_still_work(tmp_path):
    fifo = write_bad_video(str(tmp_path / "stuck.mp4"), "hang")
    t0 = time.monotonic()
    try:
        with pytest.raises(VideoError, match=r"timed out after 0.5s"):
            decode(fifo, timeout_s=0.5)
    finally:
        _release(fifo)
    assert time.monotonic() - t0 < 30  # returned: the call did not block for ever
    good = write_synthetic_clip(str(tmp_path / "ok.webm"), codec="vp9", width=64, height=48, num_frames=8)
    assert decode(good, timeout_s=5.0).frames.shape[0] == 8


def test_too_few_frames_for_num_frames(tmp_path):
    p = write_synthetic_clip(str(tmp_path / "short.mp4"), codec="h264", width=64, height=48, num_frames=6)
    with pytest.raises(VideoError, match="the stream has 6 frames, fewer than the 10 asked"):
        decode(p, num_frames=10)


def test_truncated_mp4_without_index(tmp_path):
    p = write_synthetic_clip(str(tmp_path / "full.mp4"), codec="h264", width=64, height=48, num_frames=30)
    data = open(p, "rb").read()
    cut = str(tmp_path / "cut.mp4")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(VideoError, match="truncated") as e:
        decode(cut)
    assert e.value.path == cut


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(VideoError, match="directory"):
        decode(str(tmp_path))


def test_video_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(VideoError("/x/y.mp4", "empty file (0 bytes)")))
    assert (e.path, e.reason, str(e)) == ("/x/y.mp4", "empty file (0 bytes)", "/x/y.mp4: empty file (0 bytes)")


@pytest.mark.parametrize("codec,ext", [("h264", "mp4"), ("vp9", "webm")])
@pytest.mark.parametrize("backend", ["pyav", "dali"])
def test_corrupted_bytes_give_a_sample_or_a_video_error(tmp_path, codec, ext, backend):
    """Random damage anywhere in a file: a VideoError or a well-formed sample, never another exception."""
    import numpy as np

    src = write_synthetic_clip(str(tmp_path / f"src.{ext}"), codec=codec, width=96, height=64, num_frames=30,
                               fps=10)
    data = bytearray(open(src, "rb").read())
    rng = np.random.default_rng(0)
    outcomes = []
    for i in range(12):
        d = bytearray(data)
        start = int(rng.integers(0, len(d) - 64))
        d[start:start + 48] = rng.integers(0, 256, 48, dtype=np.uint8).tobytes()
        p = str(tmp_path / f"bad{i}.{ext}")
        open(p, "wb").write(bytes(d))
        try:
            s = load_video_sample(p, VideoConfig(backend=backend if codec == "vp9" else "pyav", timeout_s=20))
            assert s.pixel_values_videos.shape[0] == int(s.video_grid_thw.prod())
            outcomes.append("ok")
        except VideoError as e:
            assert e.path == p and e.reason
            outcomes.append("error")
    assert len(outcomes) == 12
