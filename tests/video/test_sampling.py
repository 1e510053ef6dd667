"""Frame sampling rules (qwen-vl-utils fps rule; the reference's CLIP duration rule) and smart_resize."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastebm.data.video import clip_frame_indices, clip_num_frames, policy_frame_indices, policy_num_frames, smart_resize
from fastebm.data.video.sampling import sample_fps


@pytest.mark.parametrize("total,fps,expected", [
    (40, 8.0, 10),    # 5 s at 2 fps
    (300, 30.0, 16),  # 10 s -> 20, capped at max_frames
    (30, 30.0, 4),    # 1 s -> 2, raised to min_frames
    (41, 8.0, 10),    # 5.125 s -> 10.25, floored to even
    (5, 30.0, 4),     # short stream: min 4 <= 5 frames
    (3, 30.0, 2),     # fewer than min: capped by the stream, even
])
def test_policy_num_frames_reference_values(total, fps, expected):
    assert policy_num_frames(total, fps, fps=2.0, min_frames=4, max_frames=16) == expected


@given(total=st.integers(2, 5000), video_fps=st.floats(1.0, 120.0), fps=st.floats(0.25, 8.0),
       lo=st.integers(1, 8), span=st.integers(0, 40))
@settings(max_examples=300, deadline=None)
def test_policy_indices_properties(total, video_fps, fps, lo, span):
    hi = lo + span
    idx = policy_frame_indices(total, video_fps, fps=fps, min_frames=lo, max_frames=hi)
    n = len(idx)
    assert n % 2 == 0 and n <= total and n <= max(hi, 2)
    if total >= math.ceil(lo / 2) * 2 and hi >= math.ceil(lo / 2) * 2:
        assert n >= math.ceil(lo / 2) * 2
    assert idx == sorted(set(idx)) and all(0 <= i < total for i in idx)
    if n:  # reference: torch.linspace(0, total - 1, n).round()
        assert idx == torch.linspace(0, total - 1, n).round().long().tolist()
        assert idx[0] == 0 and idx[-1] == total - 1


@pytest.mark.parametrize("duration,n", [(0.5, 4), (4.99, 4), (5.0, 8), (14.9, 8), (15.0, 16), (59.9, 16),
                                        (60.0, 32), (600.0, 32)])
def test_clip_num_frames_duration_rule(duration, n):
    assert clip_num_frames(duration) == n


def test_clip_indices_truncate_like_reference():
    # 10 s at 25 fps: 8 frames of np.linspace(0, 249, 8, dtype=int): truncated, not rounded
    assert clip_frame_indices(250, 25.0) == [0, 35, 71, 106, 142, 177, 213, 249]
    assert clip_frame_indices(3, 25.0) == [0, 1, 2]  # fewer frames than the rule asks: all
    assert len(clip_frame_indices(25 * 70, 25.0)) == 32


def test_sample_fps_and_second_per_grid():
    # 40 frames at 8 fps, 10 sampled -> 2 fps, 2 frames per temporal patch -> 1 s per grid step
    assert sample_fps(10, 40, 8.0) == pytest.approx(2.0)


@given(h=st.integers(28, 4000), w=st.integers(28, 4000),
       lo=st.sampled_from([4 * 784, 128 * 784]), hi=st.sampled_from([128 * 784, 768 * 784, 16384 * 784]))
@settings(max_examples=400, deadline=None)
def test_smart_resize_matches_transformers(h, w, lo, hi):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    if max(h, w) / min(h, w) > 200 or lo > hi:
        return
    rh, rw = smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
    assert (rh, rw) == hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
    assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28


def test_smart_resize_refuses_absurd_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100)
