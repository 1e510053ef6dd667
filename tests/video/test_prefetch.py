"""The prefetcher: map's order, errors as items, timeouts that replace a worker, decode counts; the
trainer's prefetch/get pattern; on-demand decoding with the time limit; shutdown."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fastebm.config import VideoConfig
from fastebm.data.synth import BAD_REASONS, write_bad_video, write_synthetic_clip
from fastebm.data.video import (
    VideoError, VideoPrefetcher, VideoSample, decode_stats, load_video_sample, reset_decode_stats,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    with VideoPrefetcher(cfg, num_workers=2, worker_type=worker_type) as pf:
        out = list(pf.map(paths))
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
    assert st["errors"] == 3  # each failed clip counted once, in the consumer's process
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
    for path, item in VideoPrefetcher(cfg, num_workers=0).map(endless()):
        got.append(item)
        if len(got) == 3:
            break
    assert all(isinstance(x, VideoSample) for x in got)
    pf = VideoPrefetcher(cfg, num_workers=1, worker_type="thread", depth=2)
    it = pf.map(endless())
    reset_decode_stats()
    for _ in range(4):
        assert isinstance(next(it)[1], VideoSample)
    pf.close()
    # map keeps at most depth clips in flight: 4 taken, at most 2 more decoded ahead
    assert 4 <= decode_stats()["by_path"][p] <= 6


def test_thread_prefetcher_with_dali_backend(clips):
    from fastebm.data.video import dali_backend

    if not dali_backend.available():
        pytest.skip("nvidia-dali is not importable here")
    paths = [clips["vp9_odd"], clips["h264"], clips["vp9_small"]]
    reset_decode_stats()
    with VideoPrefetcher(VideoConfig(backend="dali"), num_workers=2, worker_type="thread") as pf:
        out = list(pf.map(paths))
    assert isinstance(out[0][1], VideoSample) and out[0][1].meta.backend == "dali"
    assert isinstance(out[1][1], VideoError) and "h264" in out[1][1].reason  # DALI-CPU refuses H.264
    assert isinstance(out[2][1], VideoSample)
    assert decode_stats()["decodes_dali"] == 2


def _trainer_steps(pf, batches):
    """What the trainer does: take this batch's clips with get (after a prefetch, a no-op for the
    ones already pending), and prefetch the next batch before the step runs. Returns
    {path: [VideoSample | VideoError reason, ...]} over all batches."""
    got = {}
    pf.prefetch(batches[0])
    for i, batch in enumerate(batches):
        pf.prefetch(batch)
        for path in batch:
            try:
                got.setdefault(path, []).append(pf.get(path))
            except VideoError as e:
                assert e.path == path
                got.setdefault(path, []).append(e.reason)
        if i + 1 < len(batches):
            pf.prefetch(batches[i + 1])  # decodes while "the step" runs
    return got


@pytest.mark.parametrize("worker_type", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_trainer_prefetch_get_pattern(tmp_path, worker_type):
    """prefetch(next batch) + get(path): every use decoded exactly once (a prefetched result is taken
    by one get; the same clip in a later batch is decoded again), a bad clip and a hung clip come
    back as VideoErrors naming the file, and the other clips of their batches are served."""
    good = [write_synthetic_clip(str(tmp_path / f"g{i}.webm"), codec="vp9", width=64, height=48, num_frames=12,
                                 fps=6, seed=i) for i in range(3)]
    bad = write_bad_video(str(tmp_path / "bad.mp4"), "not_video")
    hang = write_bad_video(str(tmp_path / "hang.mp4"), "hang")
    batches = [[good[0], bad, good[1]], [hang, good[2], good[0]], [good[1], good[2]]]
    cfg = VideoConfig(backend="pyav", timeout_s=2.0)
    reset_decode_stats()
    try:
        with VideoPrefetcher(cfg, num_workers=2, worker_type=worker_type) as pf:
            got = _trainer_steps(pf, batches)
            restarts = pf.restarts
    finally:
        _release(hang)
    assert len(got[bad]) == 1 and BAD_REASONS["not_video"] in got[bad][0], got[bad]
    assert got[hang] == ["timed out after 2s"]
    assert restarts == 1
    uses = {g: sum(b.count(g) for b in batches) for g in good}
    assert uses == {good[0]: 2, good[1]: 2, good[2]: 2}
    for g in good:
        assert len(got[g]) == 2 and all(isinstance(s, VideoSample) for s in got[g])
        assert torch.equal(got[g][0].pixel_values_videos, got[g][1].pixel_values_videos)
        assert got[g][0] is not got[g][1]
    st = decode_stats()
    assert st["by_path"] == uses  # once per use: nothing decoded twice for one get, nothing skipped
    assert st["errors"] == 2


@pytest.mark.parametrize("worker_type", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_no_workers_get_keeps_the_time_limit(tmp_path, worker_type):
    """num_workers=0: nothing ahead (prefetch decodes nothing), get decodes on demand, and a hung
    clip still times out (the on-demand worker is replaced) without stopping the next get."""
    good = write_synthetic_clip(str(tmp_path / "g.webm"), codec="vp9", width=64, height=48, num_frames=12, fps=6)
    hang = write_bad_video(str(tmp_path / "hang.mp4"), "hang")
    reset_decode_stats()
    try:
        with VideoPrefetcher(VideoConfig(backend="pyav", timeout_s=1.0), 0, worker_type=worker_type) as pf:
            pf.prefetch([good, hang])
            time.sleep(0.2)
            assert decode_stats()["decodes"] == 0
            with pytest.raises(VideoError, match=r"timed out after 1s") as e:
                pf.get(hang)
            assert e.value.path == hang
            assert isinstance(pf.get(good), VideoSample)
            assert isinstance(pf.get(good), VideoSample)
            assert pf.restarts == 1
    finally:
        _release(hang)
    assert decode_stats()["by_path"] == {good: 2}


def test_prefetch_guesses_are_bounded(tmp_path):
    """Guesses nobody takes (a skipped clip changes the trainer's draw) do not pile up: beyond
    max(depth, 2 x the latest call) pending results, the least recently asked are dropped; the
    latest ones are still served from their prefetch."""
    clips = [write_synthetic_clip(str(tmp_path / f"c{i}.webm"), codec="vp9", width=64, height=48, num_frames=8,
                                  fps=4, seed=i) for i in range(5)]
    reset_decode_stats()
    with VideoPrefetcher(VideoConfig(backend="pyav"), 1, worker_type="thread", depth=2) as pf:
        for c in clips:
            pf.prefetch([c])
        assert list(pf._ahead) == clips[-2:]  # the pending guesses: the two most recently asked
        pf.prefetch(clips[-2:])  # asked again: pending, not decoded twice
        assert all(isinstance(pf.get(c), VideoSample) for c in clips[-2:])
        assert not pf._ahead
        assert isinstance(pf.get(clips[0]), VideoSample)  # dropped (or never started): decoded now
    by_path = decode_stats()["by_path"]
    assert by_path[clips[-1]] == by_path[clips[-2]] == 1  # served from their prefetch
    assert 1 <= by_path[clips[0]] <= 2


@pytest.mark.slow
def test_crashed_worker_process_is_a_named_error(tmp_path):
    """A worker process that dies mid-clip (here: killed, as a crash inside FFmpeg would end it) gives
    'decoder process died' for that clip; a new process serves the next one."""
    import multiprocessing

    good = write_synthetic_clip(str(tmp_path / "g.webm"), codec="vp9", width=64, height=48, num_frames=12, fps=6)
    hang = write_bad_video(str(tmp_path / "hang.mp4"), "hang")
    try:
        with VideoPrefetcher(VideoConfig(backend="pyav", timeout_s=120), 1, worker_type="process") as pf:
            assert isinstance(pf.get(good), VideoSample)  # the worker process is up
            (worker,) = [p for p in multiprocessing.active_children() if p.name.startswith("fastebm-video")]
            pf.prefetch([hang])
            time.sleep(0.5)  # it takes the FIFO; killed before or after, its clip is the one that dies
            worker.kill()
            with pytest.raises(VideoError, match=r"decoder process died \(exit code -9\)") as e:
                pf.get(hang)
            assert e.value.path == hang
            assert isinstance(pf.get(good), VideoSample)
            assert pf.restarts == 1
    finally:
        _release(hang)


@pytest.mark.parametrize("worker_type", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_exit_with_a_hung_clip_pending_does_not_hang(tmp_path, worker_type):
    """A prefetcher left open with a worker stuck on a clip does not hold the interpreter at exit
    (daemon threads and processes), and close() returns with work pending."""
    hang = write_bad_video(str(tmp_path / "hang.mp4"), "hang")
    body = f"""
        import time
        from fastebm.config import VideoConfig
        from fastebm.data.video import VideoPrefetcher
        if __name__ == "__main__":
            closed = VideoPrefetcher(VideoConfig(backend="pyav", timeout_s=600), 1, worker_type={worker_type!r})
            closed.prefetch([{hang!r}, {hang + '.2'!r}])
            time.sleep(1.0)
            closed.close()
            print("closed")
            left = VideoPrefetcher(VideoConfig(backend="pyav", timeout_s=600), 1, worker_type={worker_type!r})
            left.prefetch([{hang!r}])
            time.sleep(1.0)
            print("exiting")
    """
    script = tmp_path / "exit.py"
    script.write_text(textwrap.dedent(body))
    try:
        out = subprocess.run([sys.executable, str(script)], env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                             capture_output=True, text=True, timeout=180)
    finally:
        _release(hang)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[:2] == ["closed", "exiting"], out.stdout
