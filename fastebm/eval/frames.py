"""The frames a judge sees: 8 frames of the clip, at most 512 px on the longer side, as JPEG data URLs."""
from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict

JUDGE_FRAMES = 8
JUDGE_MAX_SIDE = 512


def frame_urls(path: str, num_frames: int = JUDGE_FRAMES, max_side: int = JUDGE_MAX_SIDE,
               timeout_s: float = 60.0) -> list[str]:
    """``num_frames`` evenly spaced frames of ``path`` (every frame of a shorter clip), each scaled
    down to at most ``max_side`` pixels on its longer side (never up), JPEG (quality 90) as
    ``data:image/jpeg;base64,…`` URLs. A bad file raises ``VideoError`` naming it."""
    from PIL import Image

    from fastebm.data.video import decode, probe

    info = probe(path)
    n = max(1, min(num_frames, info.num_frames))
    frames = decode(path, num_frames=n, timeout_s=timeout_s).frames.numpy()  # (n, H, W, 3) uint8
    urls = []
    for f in frames:
        img = Image.fromarray(f)
        scale = max_side / max(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return urls


class FrameCache:
    """``frame_urls`` per path, the most recent ``size`` clips kept (a pairwise sample asks twice)."""

    def __init__(self, size: int = 64, **kwargs):
        self.size, self.kwargs = size, kwargs
        self._urls: OrderedDict[str, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> list[str]:
        with self._lock:
            if path in self._urls:
                self._urls.move_to_end(path)
                return self._urls[path]
        urls = frame_urls(path, **self.kwargs)
        with self._lock:
            self._urls[path] = urls
            while len(self._urls) > self.size:
                self._urls.popitem(last=False)
        return urls
