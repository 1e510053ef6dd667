"""Decode threads run torch single-threaded and leave the calling thread's torch thread count alone.

A decode thread with an OpenMP team of its own made the main thread's small ops 3-8x slower on the
2-core dev machine (libgomp throttles its spin-wait once threads outnumber cores; see
``fastebm.data.video.threads``). Each check runs in a fresh interpreter, where the main thread has
run no parallel op yet, the case in which a decode thread's ``torch.set_num_threads(1)`` would
otherwise become the main thread's count too. The count inside a decode thread is read by the
real decode: ``decoder.load_sample_frames`` wrapped to record it.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(body: str) -> list[int]:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


SPY = """
    import torch
    from fastebm.config import VideoConfig
    from fastebm.data.synth import write_synthetic_clip
    from fastebm.data.video import decoder

    inner = []
    _load = decoder.load_sample_frames
    def spy(*args, **kw):
        inner.append(torch.get_num_threads())  # in the thread that decodes
        return _load(*args, **kw)
    decoder.load_sample_frames = spy
    write_synthetic_clip({clip!r}, codec="vp9", width=64, height=48, num_frames=8, fps=4)
"""


def test_deadline_worker_is_single_threaded_and_main_keeps_its_threads(tmp_path):
    """load_video_sample with a time limit decodes on the prefetcher's on-demand decode thread."""
    clip = str(tmp_path / "a.webm")
    inner, main = _run(SPY.format(clip=clip) + f"""
    from fastebm.data.video import load_video_sample
    load_video_sample({clip!r}, VideoConfig(backend="pyav", timeout_s=30.0))
    torch.randn(64, 64) @ torch.randn(64, 64)      # the main thread's first parallel op
    print(inner[0], torch.get_num_threads())
    """)
    assert (inner, main) == (1, 2)


@pytest.mark.parametrize("where", ["prefetcher", "trainer"])
def test_decode_thread_pools_keep_main_threads(where, tmp_path):
    clip = str(tmp_path / "a.webm")
    if where == "prefetcher":
        body = SPY.format(clip=clip) + f"""
    from fastebm.data.video import VideoPrefetcher
    with VideoPrefetcher(VideoConfig(backend="pyav", timeout_s=0), num_workers=1, worker_type="thread") as pf:
        (path, sample), = list(pf.map([{clip!r}]))
    assert not isinstance(sample, Exception), sample
    torch.randn(64, 64) @ torch.randn(64, 64)
    print(inner[0], torch.get_num_threads())
    """
    else:  # the trainer's decode-ahead: the batch source's prefetcher (prefetch, then get)
        body = SPY.format(clip=clip) + f"""
    from fastebm.data.video import VideoPrefetcher
    with VideoPrefetcher(VideoConfig(backend="pyav", timeout_s=30.0), num_workers=2, worker_type="thread") as pf:
        pf.prefetch([{clip!r}])
        pf.get({clip!r})
    torch.randn(64, 64) @ torch.randn(64, 64)
    print(inner[0], torch.get_num_threads())
    """
    got = _run(body)
    assert got == [1, 2]  # the decode thread: 1; the main thread keeps its own
