"""Synthetic test videos: real encoded clips (H.264 in MP4, VP9 in WebM) of moving coloured shapes.

Deterministic for a given seed and small enough to encode in milliseconds, so tests, the bundled
sample dataset (``fastebm data sample``) and the benches make their clips on the spot instead of
shipping binaries::

    from fastebm.data.synth import write_synthetic_clip, read_frame_code
    write_synthetic_clip("clip.webm", codec="vp9", width=317, height=241, num_frames=24, fps=12, vfr=True)

Every frame carries its own index as a binary bar code across the top (``frame_code=True``), so a
test can tell exactly which source frame a decoder returned (``read_frame_code``), independent of
lossy-coding noise.
"""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

CODE_BITS = 10
"""Frame-index bits in the bar code (indices modulo 1024)."""

_CONTAINERS = {"h264": ("mp4", "libx264"), "vp9": ("webm", "libvpx-vp9"),
               "vp8": ("webm", "libvpx"), "mjpeg": ("avi", "mjpeg")}


def _code_geometry(width: int, height: int) -> tuple[int, int]:
    """(bit width, bar height) in pixels of the frame-index bar code."""
    return width // CODE_BITS, max(8, height // 10)


def synthetic_frames(*, width: int, height: int, num_frames: int, seed: int = 0,
                     frame_code: bool = True) -> np.ndarray:
    """The clip's frames before encoding: uint8 [T, H, W, 3]."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(20, 90, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Soft vertical gradient under the shapes: codecs see something like real texture.
    base = bg[None, None, :] + (yy / max(height - 1, 1))[..., None] * np.float32(60)
    n_shapes = 4
    pos = rng.uniform(0, 1, size=(n_shapes, 2)) * [width, height]
    vel = rng.uniform(-0.04, 0.04, size=(n_shapes, 2)) * [width, height]
    size = rng.uniform(0.08, 0.22, size=n_shapes) * min(width, height)
    color = rng.integers(100, 256, size=(n_shapes, 3)).astype(np.float32)
    kind = rng.integers(0, 2, size=n_shapes)  # 0 rectangle, 1 disc
    bit_w, bar_h = _code_geometry(width, height)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        img = base.copy()
        for s in range(n_shapes):
            cx, cy = (pos[s] + vel[s] * t) % [width, height]
            r = size[s] / 2
            if kind[s] == 0:
                m = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r * 0.7)
            else:
                m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            img[m] = color[s]
        if frame_code and bit_w >= 2:
            img[:bar_h] = 128
            for b in range(CODE_BITS):
                on = (t >> b) & 1
                img[:bar_h, b * bit_w:(b + 1) * bit_w] = 250 if on else 5
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def read_frame_code(frame) -> int:
    """The frame index encoded in a decoded frame's bar code (uint8 [H, W, 3], source resolution)."""
    frame = np.asarray(frame)
    height, width = frame.shape[:2]
    bit_w, bar_h = _code_geometry(width, height)
    value = 0
    for b in range(CODE_BITS):
        cell = frame[bar_h // 4: bar_h - bar_h // 4, b * bit_w + bit_w // 4:(b + 1) * bit_w - bit_w // 4]
        if float(cell.mean()) > 128:
            value |= 1 << b
    return value


def vfr_timestamps(num_frames: int, fps: float, seed: int = 0) -> list[float]:
    """Presentation times (s) of a variable-frame-rate clip: intervals of 0.5x to 1.5x of 1/fps."""
    rng = np.random.default_rng(seed + 7919)
    gaps = rng.uniform(0.5, 1.5, size=num_frames) / fps
    ts = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    return [round(float(t), 3) for t in ts]  # millisecond grid, as in Matroska


def write_synthetic_clip(path: str, *, codec: str = "h264", width: int = 64, height: int = 48,
                         num_frames: int = 16, fps: float = 8.0, seed: int = 0, vfr: bool = False,
                         gop: int = 12, frame_code: bool = True, crf: int = 20, _format: str = "") -> str:
    """Encode a clip of moving coloured shapes with PyAV; returns ``path``.

    ``codec``: ``h264`` (MP4; width and height must be even for 4:2:0), ``vp9`` or ``vp8`` (WebM,
    any size), ``mjpeg`` (AVI). ``vfr``: frame intervals vary between 0.5 and 1.5 of 1/fps
    (``vfr_timestamps``). ``gop``: keyframe interval, so seeking decoders have work to do.
    """
    import av

    if codec not in _CONTAINERS:
        raise ValueError(f"write_synthetic_clip: codec {codec!r}: expected one of {sorted(_CONTAINERS)}")
    if codec == "h264" and (width % 2 or height % 2):
        raise ValueError(f"write_synthetic_clip: h264 4:2:0 needs even width and height, got {width}x{height}")
    if num_frames < 1 or width < 2 or height < 2:
        raise ValueError("write_synthetic_clip: need num_frames >= 1 and width, height >= 2")
    fmt, encoder = _CONTAINERS[codec]
    fmt = _format or fmt  # (bad-input files keep their container whatever the file name says)
    frames = synthetic_frames(width=width, height=height, num_frames=num_frames, seed=seed,
                              frame_code=frame_code)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    time_base = Fraction(1, 1000) if vfr else 1 / rate
    with av.open(path, mode="w", format=fmt) as out:
        stream = out.add_stream(encoder, rate=rate)
        stream.width, stream.height = width, height
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if codec == "mjpeg":
            stream.pix_fmt = "yuvj420p"
            stream.codec_context.qmin, stream.codec_context.qmax = 2, 4
        else:
            stream.pix_fmt = "yuv420p"
            stream.codec_context.gop_size = gop
        opts = {}
        if codec == "h264":
            opts = {"preset": "ultrafast", "crf": str(crf), "bf": "0"}
        elif codec in ("vp9", "vp8"):
            opts = {"deadline": "realtime", "cpu-used": "8", "crf": str(crf), "b": "0",
                    "lag-in-frames": "0", "row-mt": "1"}
        stream.options = opts
        pts = ([round(t * 1000) for t in vfr_timestamps(num_frames, fps, seed)] if vfr
               else list(range(num_frames)))
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frames[t], format="rgb24")
            frame.pts = pts[t]
            frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


BAD_KINDS = ("missing", "empty", "truncated", "not_video", "too_few_frames", "absurd_dims", "hang")
"""Every kind of bad input ``write_bad_video`` makes (``hang`` needs a POSIX FIFO)."""

BAD_REASONS = {
    "missing": "file not found",
    "empty": "empty file",
    "truncated": "truncated",
    "not_video": "not a video",
    "too_few_frames": "fewer than",
    "absurd_dims": "absurd dimensions",
    "hang": "timed out after",
}
"""A substring of ``VideoError.reason`` (and of skipped.jsonl's reason) for each bad kind, with the
default VideoConfig (min_frames 4) and a finite ``timeout_s`` for ``hang``."""


def write_bad_video(path: str, kind: str, *, seed: int = 0) -> str:
    """Write one bad input of ``kind`` (see ``BAD_KINDS``) at ``path`` and return ``path``.

    missing: nothing is written (any existing file is removed). empty: 0 bytes. truncated: a
    4 s VP9 clip cut to its first 40% of bytes (header intact, the rest of the stream gone).
    not_video: text bytes. too_few_frames: a valid 3-frame clip (fewer than min_frames 4).
    absurd_dims: a valid 1000x4 clip (aspect ratio 250, more than Qwen2-VL accepts). hang: a named
    pipe no one writes to, so opening it blocks forever (the time limit must turn it into an error;
    open the pipe for writing and close it to release a stuck reader).
    """
    if kind not in BAD_KINDS:
        raise ValueError(f"write_bad_video: kind {kind!r}: expected one of {BAD_KINDS}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.lexists(path):
        os.remove(path)
    if kind == "missing":
        return path
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "truncated":
        tmp = path + ".full.webm"
        write_synthetic_clip(tmp, codec="vp9", width=96, height=64, num_frames=40, fps=10, seed=seed)
        with open(tmp, "rb") as f:
            data = f.read()
        os.remove(tmp)
        with open(path, "wb") as f:
            f.write(data[: int(len(data) * 0.4)])
    elif kind == "not_video":
        with open(path, "wb") as f:
            f.write(b"This is a subtitle file, not a video.\n" * 64)
    elif kind == "too_few_frames":
        write_synthetic_clip(path, codec="vp9", width=64, height=48, num_frames=3, fps=10, seed=seed,
                             _format="webm")
    elif kind == "absurd_dims":
        write_synthetic_clip(path, codec="vp9", width=1000, height=4, num_frames=8, fps=10, seed=seed,
                             frame_code=False, _format="webm")
    elif kind == "hang":
        os.mkfifo(path)
    return path
