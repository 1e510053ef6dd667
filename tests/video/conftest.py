"""Clips for the video tests: real encoded files, written once per session (each in milliseconds)."""
import pytest

from fastebm.data.synth import write_synthetic_clip


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    spec = {
        # name: (codec, width, height, frames, fps, vfr)
        "vp9_odd": ("vp9", 317, 241, 40, 8.0, False),
        "vp9_odd_vfr": ("vp9", 317, 241, 40, 8.0, True),
        "vp9_small": ("vp9", 64, 48, 24, 12.0, False),
        "h264": ("h264", 160, 90, 36, 12.0, False),
        "h264_vfr": ("h264", 96, 64, 30, 10.0, True),
        "mjpeg": ("mjpeg", 64, 48, 16, 8.0, False),
    }
    ext = {"vp9": "webm", "h264": "mp4", "mjpeg": "avi"}
    out = {}
    for i, (name, (codec, w, h, n, fps, vfr)) in enumerate(spec.items()):
        out[name] = write_synthetic_clip(str(d / f"{name}.{ext[codec]}"), codec=codec, width=w, height=h,
                                         num_frames=n, fps=fps, vfr=vfr, seed=i)
    return out
