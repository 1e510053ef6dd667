"""Prefetching: decode clips ahead of the model in worker processes or threads.

    from fastebm.data.video.loader import VideoPrefetcher

    with VideoPrefetcher(paths, cfg.video, num_workers=2) as pf:
        for path, item in pf:              # input order, one item per path
            if isinstance(item, VideoError):
                skipped.append({"video": path, "reason": item.reason})   # -> skipped.jsonl
                continue
            sample = item                  # VideoSample

``paths`` may be any iterable, also an endless generator: at most ``depth`` clips are decoded
ahead of the consumer. Workers run ``load_sample_frames`` (cache, then one decode) and send back
uint8 frames; the consumer's process normalises and patchifies (on ``device`` if given), so the
heavy float tensors never cross a process boundary.

Time limits: each clip gets ``cfg.timeout_s`` from the moment a worker takes it. A process
worker that overruns is killed and replaced; a thread worker (threads cannot be killed) is
abandoned and replaced. Either way the clip comes back as ``VideoError(path, "timed out after
Ns")``, and a worker process that dies (a crash inside FFmpeg) gives ``"decoder process died"``.

Worker kinds: ``process`` (default on the CPU: PyAV holds the GIL for parts of its work, and
processes can be killed), ``thread`` (DALI on a GPU: frames stay in GPU memory, no pickling).
Counts from workers are added to ``decode_stats()`` of the consumer's process.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import queue
import threading
import time
from typing import Iterable, Iterator, Optional, Union

import torch

from . import api
from .common import VideoError, VideoMeta, VideoSample

log = logging.getLogger("fastebm.video")

_READY = "__ready__"


def _work(path: str, cfg, sizes: dict):
    """One task in a worker: returns ("ok", (policy, clip, meta_dict, from_cache)) or ("err", VideoError)."""
    try:
        policy, clip, meta, from_cache = api._guarded(path, lambda: api.load_sample_frames(path, cfg, **sizes))()
        return "ok", (policy, clip, meta.to_dict(), from_cache)
    except VideoError as e:
        return "err", e
    except Exception as e:  # a bug or an unexpected library error: still never stops the run
        return "err", VideoError(path, f"unexpected decoder error: {type(e).__name__}: {e}")


def _process_main(wid: int, tasks, results, cfg, sizes: dict) -> None:
    torch.set_num_threads(1)  # one decode per worker; the workers are the parallelism
    results.put((wid, None, _READY, None))
    while True:
        task = tasks.get()
        if task is None:
            return
        seq, path = task
        status, payload = _work(path, cfg, sizes)
        results.put((wid, seq, status, payload))


def _thread_main(wid: int, tasks, results, cfg, sizes: dict, stop: threading.Event) -> None:
    api.decode_thread_init()
    results.put((wid, None, _READY, None))
    while not stop.is_set():
        task = tasks.get()
        if task is None:
            return
        seq, path = task
        status, payload = _work(path, cfg, sizes)
        if stop.is_set():
            return
        results.put((wid, seq, status, payload))


@dataclasses.dataclass
class _Worker:
    wid: int
    handle: Union[mp.Process, threading.Thread]
    tasks: object
    ready: bool = False
    busy: Optional[tuple] = None  # (seq, path, started)
    stop: Optional[threading.Event] = None


class VideoPrefetcher:
    """Iterate ``(path, VideoSample | VideoError)`` over ``paths`` in order, decoding ahead."""

    def __init__(self, paths: Iterable[str], cfg, num_workers: Optional[int] = None, *,
                 worker_type: Optional[str] = None, depth: Optional[int] = None,
                 device: Optional[Union[str, torch.device]] = None, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2, mp_context: str = "spawn"):
        self.paths = iter(paths)
        self.cfg = cfg
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        wt = worker_type or getattr(cfg, "worker_type", "auto")
        if wt == "auto":  # DALI on a GPU keeps its frames on the GPU: threads; else processes
            wt = "thread" if (cfg.backend in ("auto", "dali") and api.gpu_available()
                              and api.dali_backend.available()) else "process"
        self.worker_type = wt
        self.depth = depth or max(2, 2 * self.num_workers)
        self.device = device
        self.sizes = dict(patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size)
        self.timeout_s = cfg.timeout_s if cfg.timeout_s and cfg.timeout_s > 0 else None
        self._ctx = mp.get_context(mp_context)
        self._workers: list[_Worker] = []
        self._results = None
        self._next_wid = 0
        self._closed = False
        self._pending_msg = None
        self.restarts = 0
        """Workers replaced after a timeout or a crash."""

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        wid = self._next_wid
        self._next_wid += 1
        if self.worker_type == "process":
            tasks = self._ctx.Queue()
            h = self._ctx.Process(target=_process_main, args=(wid, tasks, self._results, self.cfg, self.sizes),
                                  daemon=True, name=f"fastebm-video-{wid}")
            h.start()
            w = _Worker(wid, h, tasks)
        else:
            tasks = queue.Queue()
            stop = threading.Event()
            api.keep_torch_threads()
            h = threading.Thread(target=_thread_main, args=(wid, tasks, self._results, self.cfg, self.sizes, stop),
                                 daemon=True, name=f"fastebm-video-{wid}")
            h.start()
            w = _Worker(wid, h, tasks, stop=stop)
        self._workers.append(w)
        return w

    def _retire(self, w: _Worker, kill: bool) -> None:
        self._workers.remove(w)
        if w.stop is not None:
            w.stop.set()
        if isinstance(w.handle, mp.process.BaseProcess):
            if kill:
                w.handle.kill()
            else:
                try:
                    w.tasks.put(None)
                except Exception:
                    pass
            w.handle.join(timeout=5)
            if w.handle.is_alive():
                w.handle.kill()
            w.tasks.close()
        else:
            w.tasks.put(None)  # a stuck thread never reads it; it is a daemon and is left behind

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in list(self._workers):
            self._retire(w, kill=w.busy is not None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- results ---------------------------------------------------------------------------------

    def _finish(self, path: str, status: str, payload) -> Union[VideoSample, VideoError]:
        if status == "err":
            if self.worker_type == "process":
                api.count("error")
            return payload
        policy, clip, meta_d, from_cache = payload
        meta = VideoMeta(**meta_d)
        if self.worker_type == "process":  # counted in the worker's process: count here too
            api.count("cache_hit" if from_cache else "decode", path, None if from_cache else meta.backend)
        if self.device is not None:
            policy, clip = policy.to(self.device, non_blocking=True), clip.to(self.device, non_blocking=True)
        return api.build_sample(policy, clip, meta, **self.sizes)

    def _inline(self) -> Iterator[tuple[str, Union[VideoSample, VideoError]]]:
        for path in self.paths:
            path = str(path)
            try:
                yield path, api.load_video_sample(path, self.cfg, **self.sizes)
            except VideoError as e:
                yield path, e

    def __iter__(self) -> Iterator[tuple[str, Union[VideoSample, VideoError]]]:
        if self.num_workers <= 0:
            yield from self._inline()
            return
        self._results = self._ctx.Queue() if self.worker_type == "process" else queue.Queue()
        for _ in range(self.num_workers):
            self._spawn()
        done: dict[int, tuple[str, Union[VideoSample, VideoError]]] = {}
        waiting: list[tuple[int, str]] = []  # read from paths, not yet given to a worker
        next_out = next_in = 0
        exhausted = False
        try:
            while True:
                # Read ahead, at most ``depth`` clips beyond the consumer.
                while not exhausted and next_in - next_out < self.depth:
                    try:
                        waiting.append((next_in, str(next(self.paths))))
                        next_in += 1
                    except StopIteration:
                        exhausted = True
                for w in self._workers:
                    if w.ready and w.busy is None and waiting:
                        seq, path = waiting.pop(0)
                        w.busy = (seq, path, time.monotonic())
                        w.tasks.put((seq, path))
                if next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
                    continue
                if exhausted and next_out >= next_in:
                    return
                self._poll()
                for seq, item in self._collect():
                    done[seq] = item
                for seq, item in self._overdue():
                    done[seq] = item
        finally:
            self.close()

    def _poll(self) -> None:
        """Wait for the next message (bounded, so deadlines and deaths are checked)."""
        wait = 0.5
        if self.timeout_s:
            now = time.monotonic()
            for w in self._workers:
                if w.busy:
                    wait = max(0.01, min(wait, w.busy[2] + self.timeout_s - now))
        try:
            self._pending_msg = self._results.get(timeout=wait)
        except queue.Empty:
            self._pending_msg = None

    def _collect(self):
        out = []
        msg = self._pending_msg
        self._pending_msg = None
        while msg is not None:
            wid, seq, status, payload = msg
            w = next((x for x in self._workers if x.wid == wid), None)
            if w is not None:  # results of retired (timed-out) workers are dropped
                if status == _READY:
                    w.ready = True
                elif w.busy and w.busy[0] == seq:
                    out.append((seq, (w.busy[1], self._finish(w.busy[1], status, payload))))
                    w.busy = None
            try:
                msg = self._results.get_nowait()
            except queue.Empty:
                msg = None
        return out

    def _overdue(self):
        out = []
        now = time.monotonic()
        for w in list(self._workers):
            dead = isinstance(w.handle, mp.process.BaseProcess) and not w.handle.is_alive()
            late = w.busy is not None and self.timeout_s is not None and now - w.busy[2] > self.timeout_s
            if not (dead or late):
                continue
            if dead and not w.ready:
                raise RuntimeError(f"video prefetch worker {w.wid} died while starting (exit code {w.handle.exitcode})")
            if w.busy is not None:
                seq, path, _ = w.busy
                if late and not dead:
                    reason = f"timed out after {self.timeout_s:g}s"
                else:
                    reason = f"decoder process died (exit code {w.handle.exitcode})"
                api.count("error")
                log.warning("video %s: %s; restarting the worker", path, reason)
                out.append((seq, (path, VideoError(path, reason))))
            self._retire(w, kill=True)
            self.restarts += 1
            self._spawn()
        return out
