"""The video prefetcher: clips decoded ahead on worker threads or processes, each under a time limit.

    from fastebm.data.video import VideoError, VideoPrefetcher

    # the trainer: this batch's clips, and the next batch's while the step runs
    with VideoPrefetcher(cfg.video, worker_type="thread") as pf:
        pf.prefetch(batch)                       # already pending ones are not decoded twice
        for path in batch:
            try:
                sample = pf.get(path)            # decoded ahead (or now); consumed by this get
            except VideoError as e:              # bad file, or over cfg.video.timeout_s
                skipped.append({"video": path, "reason": e.reason})
        pf.prefetch(next_batch)                  # decodes while the step runs

    # `fastebm data precompute`: a list, or an endless generator, in input order
    with VideoPrefetcher(cfg.video, num_workers=2) as pf:
        for path, item in pf.map(paths):         # item: VideoSample | VideoError
            ...

How it works. ``num_workers`` workers, each watched by a supervisor thread (a "slot") that takes
the next job (``get``'s first, then ``prefetch``'s and ``map``'s in order), hands it to its worker and
waits at most ``cfg.timeout_s`` from that moment. A worker that overruns is replaced: a process is
killed, a thread (which cannot be killed) is abandoned (daemon, it never blocks exit); the clip
becomes ``VideoError(path, "timed out after Ns")``, and a process that dies (a crash inside FFmpeg)
gives ``"decoder process died (exit code N)"``. A process's start-up (imports) does not count.

Worker kinds (``worker_type``, default ``cfg.worker_type``): ``thread`` (DALI on a GPU keeps its
frames on the GPU; PyAV and DALI release the GIL while decoding; a thread worker returns the whole
``VideoSample``, on the CUDA device of the thread that made the prefetcher) and ``process``
(killable; a process worker returns uint8 frames and the sample is built by ``get`` in the
consumer's process, on ``device`` if given, so the float patches never cross a process boundary).
``auto``: threads when DALI decodes on a GPU or ``num_workers`` is 0, else processes.

``num_workers=0``: nothing is decoded ahead (``prefetch`` does nothing, ``map`` takes one clip at a
time); ``get`` decodes on demand on an idle on-demand worker of the same kind (one is started when
none is idle), so the time limit still holds. On-demand decode threads are shared by every
prefetcher of the process and reused (DALI builds its pipelines once per thread): this is how
``load_video_sample`` and ``decode(timeout_s=...)`` keep their time limit. Without a time limit a
thread-kind ``get`` decodes in the calling thread.

Torch threads: every decode thread (workers and supervisors) runs torch single-threaded
(``threads.decode_thread_init``), and each public call first fixes the calling thread's own count
(``threads.keep_torch_threads``); see threads.py for the measured 3-8x slowdown this prevents.

Counting: decodes and cache hits count in ``decode_stats()`` of this process when they happen
(a process worker's when its frames arrive), whether or not the clip is taken; ``errors`` counts
each failed clip once (bad file, time limit, dead process).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing as mp
import queue
import sys
import threading
import traceback
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from . import decoder
from .backend import dali_on_gpu
from .common import VideoError, VideoSample
from .stats import count
from .threads import decode_thread_init, keep_torch_threads

log = logging.getLogger("fastebm.video")

STARTUP_S = 300.0
"""Longest wait for a worker process to start (it imports torch and fastebm: seconds on a busy
machine); not part of any clip's time limit."""

_READY = "__ready__"

Item = Union[VideoSample, VideoError]


# ----------------------------------------------------------------------------------------------
# Jobs: what a worker runs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    path: str
    fn: Callable
    args: tuple
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    status: str = ""
    """``ok`` (value: the result), ``err`` (a VideoError), ``exc`` (another exception: a bug),
    ``fatal`` (value: why no worker could run it)."""
    value: object = None
    claimed: bool = False
    """Taken by a slot (set under the pool's lock)."""
    cancelled: bool = False
    """Nobody will ask for it (a dropped guess, a closed ``map``): a slot skips it if not claimed yet."""


def _execute(fn: Callable, args: tuple, catch: type = BaseException) -> tuple[str, object]:
    """(status, value) of ``fn(*args)``. In a worker nothing escapes (a thread that died would leave
    its job unanswered); in the caller's own thread ``catch=Exception`` lets Ctrl-C through."""
    try:
        return "ok", fn(*args)
    except VideoError as e:
        return "err", e
    except catch as e:  # a bug or an unexpected library error: the caller decides
        return "exc", e


def _frames_job(path: str, cfg, sizes: dict):
    """In a worker process: (policy uint8, CLIP uint8, meta, from_cache) from the cache or one decode."""
    return decoder.guarded(path, lambda: decoder.load_sample_frames(path, cfg, **sizes))()


def _sample_job(path: str, cfg, sizes: dict, device) -> VideoSample:
    """In a decode thread: the whole sample (on ``device`` when given, else where it was decoded)."""
    return decoder.guarded(path, lambda: decoder.sample_now(path, cfg, sizes, device))()


# ----------------------------------------------------------------------------------------------
# Workers: one thread or one process, one job at a time
# ----------------------------------------------------------------------------------------------


def _thread_main(inbox: queue.SimpleQueue, outbox: queue.SimpleQueue, cuda_device: Optional[int]) -> None:
    decode_thread_init()
    if cuda_device is not None:  # the CUDA device is per thread: DALI decodes on the consumer's GPU
        torch.cuda.set_device(cuda_device)
    while (task := inbox.get()) is not None:
        outbox.put(_execute(*task))


class _ThreadWorker:
    def __init__(self, name: str, cuda_device: Optional[int]):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.broken = False
        """Overran its time limit: never used again."""
        threading.Thread(target=_thread_main, args=(self.inbox, self.outbox, cuda_device), daemon=True,
                         name=name).start()

    def run(self, job: _Job, timeout_s: Optional[float]) -> tuple[str, object]:
        self.inbox.put((job.fn, job.args))
        try:
            return self.outbox.get(timeout=timeout_s)
        except queue.Empty:
            self.broken = True
            self.close()
            return "err", VideoError(job.path, f"timed out after {timeout_s:g}s")

    def close(self, busy: bool = False) -> None:
        self.inbox.put(None)  # a thread stuck in a C call reads it when (if) the call returns


def _process_main(conn) -> None:
    torch.set_num_threads(1)  # one decode per process: the processes are the parallelism
    # What a decode imports lazily (torchvision's resize takes ~1.6 s to import on the 2-core box):
    # imported before READY, so start-up is never part of the first clip's time limit.
    import av  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):  # the consumer is gone, or Ctrl-C reached the group
            return
        if task is None:
            return
        out = _execute(*task)
        try:
            conn.send(out)  # tensors go through shared memory (torch's reductions)
        except Exception as e:  # an exception that does not pickle: send its text
            conn.send(("exc", RuntimeError(f"{type(out[1]).__name__}: {out[1]} (not picklable: {e})\n"
                                           + "".join(traceback.format_exception(out[1])))))


class _ProcessWorker:
    def __init__(self, ctx, name: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_process_main, args=(child,), daemon=True, name=name)
        self.proc.start()
        child.close()  # ours closed: the pipe reports EOF when the process dies
        self.broken = False
        """Overran its time limit or died: never used again."""
        self._lock = threading.Lock()
        self._closed = False

    def wait_ready(self) -> Optional[str]:
        """None once the process has started; else why it did not (the process is then gone)."""
        try:
            if self.conn.poll(STARTUP_S) and self.conn.recv() == _READY:
                return None
        except (EOFError, OSError):
            pass
        self.close(busy=True)
        code = self.proc.exitcode
        return (f"video decode process did not start (exit code {code})" if code is not None else
                f"video decode process did not start within {STARTUP_S:g}s")

    def run(self, job: _Job, timeout_s: Optional[float]) -> tuple[str, object]:
        try:
            self.conn.send((job.fn, job.args))
            if self.conn.poll(timeout_s):
                return self.conn.recv()
            reason = f"timed out after {timeout_s:g}s"
        except (EOFError, OSError):  # the pipe closed: the process died
            reason = ""
        self.broken = True
        self.close(busy=True)
        return "err", VideoError(job.path, reason or f"decoder process died (exit code {self.proc.exitcode})")

    def close(self, busy: bool = False) -> None:
        """Stop the process: asked to exit when idle, killed when ``busy``; joined either way."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if busy or not self.proc.is_alive():
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


def _run(worker, job: _Job, timeout_s: Optional[float]) -> tuple[str, object]:
    try:
        return worker.run(job, timeout_s)
    except Exception as e:  # e.g. a result that does not unpickle: the worker is not trusted again
        worker.broken = True
        worker.close(busy=True)
        return "exc", e


_spare_threads: dict[Optional[int], list] = {}
"""Idle on-demand decode threads, per CUDA device, shared by every prefetcher of the process."""
_spare_lock = threading.Lock()


def _spare_thread_list(cuda_device: Optional[int]) -> list:
    with _spare_lock:
        return _spare_threads.setdefault(cuda_device, [])


def _run_on_spare(spares: list, lock, start: Callable, job: _Job, timeout_s: Optional[float]):
    """``job`` on an idle worker from ``spares`` (``start()`` one when none is idle), watched by the
    calling thread: (status, value, worker replaced)."""
    with lock:
        worker = spares.pop() if spares else None
    if worker is None:
        worker, why = start()
        if worker is None:
            return "fatal", why, False
    status, value = _run(worker, job, timeout_s)
    if not worker.broken:
        with lock:
            spares.append(worker)
    return status, value, worker.broken


def _cuda_device(device) -> Optional[int]:
    """The CUDA device thread workers decode on: ``device``'s, else the calling thread's once CUDA is in use."""
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        return torch.cuda.current_device() if index is None else index
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def call_on_decode_thread(fn: Callable, path: str, timeout_s: float):
    """``fn()`` on an on-demand decode thread (the ones ``VideoPrefetcher(num_workers=0)`` uses), at
    most ``timeout_s`` seconds: past it ``VideoError(path, "timed out after Ns")`` and the thread is
    abandoned. What ``fn`` raises is raised here. ``decode(timeout_s=...)`` runs through this."""
    keep_torch_threads()
    cuda = _cuda_device(None)
    status, value, _ = _run_on_spare(_spare_thread_list(cuda), _spare_lock,
                                     lambda: (_ThreadWorker("fastebm-video-ondemand", cuda), None),
                                     _Job(str(path), fn, ()), timeout_s)
    if status == "ok":
        return value
    raise value if isinstance(value, BaseException) else RuntimeError(value)


# ----------------------------------------------------------------------------------------------
# The pool: slots (supervised workers), the job queues, on-demand workers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Slot:
    thread: Optional[threading.Thread] = None
    worker: object = None
    busy: bool = False


class _Pool:
    """Everything the supervisor threads touch (not the VideoPrefetcher itself, so that an
    unclosed prefetcher is still collected and closed)."""

    def __init__(self, worker_type: str, num_workers: int, timeout_s: Optional[float], cuda_device: Optional[int]):
        self.worker_type = worker_type
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.cuda_device = cuda_device
        self.ctx = mp.get_context("spawn")  # fork after threads exist is unsafe
        self.cond = threading.Condition()
        self.urgent: collections.deque = collections.deque()  # get's jobs
        self.queue: collections.deque = collections.deque()   # prefetch's and map's, in order
        self.live: set = set()                                # jobs a caller may wait on
        self.slots: list[_Slot] = []
        self.spares: list = []  # idle on-demand processes (on-demand threads: _spare_threads)
        self.closed = False
        self.restarts = 0
        self.started = 0

    # -- workers ---------------------------------------------------------------------------------

    def new_worker(self):
        """(worker, None), or (None, why) when a process did not start."""
        with self.cond:
            self.started += 1
            name = f"fastebm-video-{self.started}"
        try:
            if self.worker_type == "thread":
                return _ThreadWorker(name, self.cuda_device), None
            w = _ProcessWorker(self.ctx, name)
        except Exception as e:  # e.g. spawn refused (a main module without the __main__ guard)
            return None, f"could not start a video decode {self.worker_type}: {type(e).__name__}: {e}"
        why = w.wait_ready()
        return (w, None) if why is None else (None, why)

    def replaced(self, job: _Job, value) -> None:
        with self.cond:
            if self.closed:
                return
            self.restarts += 1
        log.warning("video %s: %s; replacing the %s worker", job.path, getattr(value, "reason", value),
                    self.worker_type)

    def start_slots(self) -> None:
        """Start the supervisor threads (under ``cond``; the caller has called keep_torch_threads)."""
        while len(self.slots) < self.num_workers:
            slot = _Slot()
            slot.thread = threading.Thread(target=self.supervise, args=(slot,), daemon=True,
                                           name=f"fastebm-video-slot-{len(self.slots)}")
            self.slots.append(slot)
            slot.thread.start()

    def supervise(self, slot: _Slot) -> None:
        decode_thread_init()  # a video thread: it runs no parallel op, and must not get a team
        while (job := self.take(slot)) is not None:
            if slot.worker is None:
                worker, why = self.new_worker()
                if worker is None:
                    self.complete(job, "fatal", why)
                    with self.cond:
                        slot.busy = False
                    continue
                with self.cond:
                    slot.worker = worker
                    closing = self.closed
                if closing:
                    break
            status, value = _run(slot.worker, job, self.timeout_s)
            if slot.worker.broken:
                slot.worker = None
                self.replaced(job, value)
            self.complete(job, status, value)
            with self.cond:
                slot.busy = False
        if slot.worker is not None:
            slot.worker.close()

    def take(self, slot: _Slot) -> Optional[_Job]:
        """The next job for ``slot`` (get's first), or None once closed."""
        with self.cond:
            while not self.closed:
                for q in (self.urgent, self.queue):
                    while q:
                        job = q.popleft()
                        if not (job.claimed or job.cancelled or job.done.is_set()):
                            job.claimed = slot.busy = True
                            return job
                self.cond.wait()
            return None

    # -- jobs ------------------------------------------------------------------------------------

    def enqueue(self, job: _Job, urgent: bool = False) -> _Job:
        with self.cond:
            if self.closed:
                raise RuntimeError("VideoPrefetcher is closed")
            self.start_slots()
            (self.urgent if urgent else self.queue).append(job)
            self.live.add(job)
            self.cond.notify()
        return job

    def bump(self, job: _Job) -> None:
        """``get`` waits for ``job``: it goes before every queued guess."""
        with self.cond:
            if not job.claimed:
                self.urgent.append(job)
                self.cond.notify()

    def cancel(self, jobs: Iterable[_Job]) -> None:
        with self.cond:
            for job in jobs:
                job.cancelled = True
                self.live.discard(job)

    def run_on_demand(self, job: _Job) -> None:
        """num_workers=0: ``job`` on an on-demand worker, watched by the calling thread."""
        if self.worker_type == "thread":
            if self.timeout_s is None:  # nothing to watch: decode here
                self.complete(job, *_execute(job.fn, job.args, catch=Exception))
                return
            cuda = self.cuda_device
            spares, lock = _spare_thread_list(cuda), _spare_lock
            start = lambda: (_ThreadWorker("fastebm-video-ondemand", cuda), None)  # noqa: E731
        else:
            with self.cond:
                if self.closed:
                    raise RuntimeError("VideoPrefetcher is closed")
            spares, lock, start = self.spares, self.cond, self.new_worker
        with self.cond:
            self.live.add(job)
        status, value, replaced = _run_on_spare(spares, lock, start, job, self.timeout_s)
        if replaced:
            self.replaced(job, value)
        self.complete(job, status, value)
        if self.worker_type == "process" and self.closed:  # closed meanwhile: its worker went back to spares
            self.close_spares()

    def complete(self, job: _Job, status: str, value) -> None:
        """Record the outcome (once; a job already failed by close() stays so) and count it."""
        with self.cond:
            if job.done.is_set():
                return
            job.status, job.value = status, value
            self.live.discard(job)
            job.done.set()
        if status == "ok" and job.fn is _frames_job:  # decoded in another process: counted here
            meta, from_cache = value[2], value[3]
            count("cache_hit" if from_cache else "decode", job.path, None if from_cache else meta.backend)
        elif status in ("err", "exc"):
            count("error")

    # -- shutdown --------------------------------------------------------------------------------

    def close_spares(self) -> None:
        with self.cond:
            spares, self.spares = self.spares, []
        for w in spares:
            w.close()

    def close(self) -> None:
        """Fail the jobs still waited on, kill busy processes, let the supervisors stop their workers.

        Does not wait for a busy decode thread (it is abandoned, daemon); an idle worker process is
        asked to exit and joined by its supervisor, which this waits for (a few seconds at most)."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
            live, self.live = list(self.live), set()
            self.urgent.clear()
            self.queue.clear()
            busy = [s.worker for s in self.slots if s.busy and isinstance(s.worker, _ProcessWorker)]
            idle = [s for s in self.slots if not s.busy]
            self.cond.notify_all()
        for job in live:
            self.complete(job, "fatal", "VideoPrefetcher closed")
        for worker in busy:
            worker.close(busy=True)
        self.close_spares()
        for s in idle:
            if s.thread is not threading.current_thread():
                s.thread.join(timeout=15)


# ----------------------------------------------------------------------------------------------
# The prefetcher
# ----------------------------------------------------------------------------------------------


def resolve_worker_type(cfg, num_workers: int, worker_type: Optional[str] = None) -> str:
    """``thread`` or ``process``: ``worker_type``, else ``cfg.worker_type``; ``auto`` gives threads
    when DALI decodes on a GPU (frames stay there) or nothing is decoded ahead, else processes."""
    wt = worker_type or getattr(cfg, "worker_type", "auto")
    if wt == "auto":
        wt = "thread" if num_workers <= 0 or dali_on_gpu(cfg.backend) else "process"
    if wt not in ("thread", "process"):
        raise ValueError(f"video worker_type {wt!r}: expected 'auto', 'thread' or 'process'")
    return wt


class VideoPrefetcher:
    """Decode clips ahead of their use; every clip under ``cfg.timeout_s``. See the module docstring.

    ``cfg``: a ``VideoConfig``. ``num_workers`` (default ``cfg.num_workers``): workers decoding
    ahead (0: none; ``get`` decodes on demand). ``worker_type``: ``thread`` / ``process`` / ``auto``
    (default ``cfg.worker_type``). ``depth``: clips ``map`` keeps in flight (default
    ``max(2, 2 * num_workers)``). ``device``: where samples are built (default: where decoded).
    The patch sizes are the model's, as in ``load_video_sample``.
    """

    def __init__(self, cfg, num_workers: Optional[int] = None, *, worker_type: Optional[str] = None,
                 depth: Optional[int] = None, device: Optional[Union[str, torch.device]] = None,
                 patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2):
        keep_torch_threads()  # before any decode thread lowers the count new threads take
        self.cfg = cfg
        self.num_workers = max(0, cfg.num_workers if num_workers is None else num_workers)
        self.worker_type = resolve_worker_type(cfg, self.num_workers, worker_type)
        self.depth = depth or max(2, 2 * self.num_workers)
        self.device = device
        self.sizes = dict(patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size)
        self.timeout_s = cfg.timeout_s if cfg.timeout_s and cfg.timeout_s > 0 else None
        self._pool = _Pool(self.worker_type, self.num_workers, self.timeout_s, _cuda_device(device))
        self._ahead: dict[str, _Job] = {}  # path -> its prefetch, most recently asked last

    @property
    def restarts(self) -> int:
        """Workers replaced after a timeout or a crash."""
        return self._pool.restarts

    # -- the three ways in -----------------------------------------------------------------------

    def prefetch(self, paths: Iterable[str]) -> None:
        """Start decoding ``paths`` ahead (a path already pending is not decoded twice).

        Guesses nobody takes are bounded: beyond ``max(depth, 2 * len(paths))`` pending results the
        least recently asked are dropped. With ``num_workers=0`` this does nothing."""
        if self.num_workers <= 0:
            return
        keep_torch_threads()
        paths = [str(p) for p in paths]
        pool = self._pool
        with pool.cond:
            stale = []
            for p in paths:
                job = self._ahead.pop(p, None)
                self._ahead[p] = job if job is not None else pool.enqueue(self._job(p))
            while len(self._ahead) > max(self.depth, 2 * len(paths)):
                stale.append(self._ahead.pop(next(iter(self._ahead))))
            pool.cancel(stale)

    def get(self, path: str) -> VideoSample:
        """The clip's sample: its prefetch (consumed here: a later ``get`` decodes again, or reads
        the cache), else decoded now, before any guess. Raises ``VideoError`` (bad file, time limit,
        dead process); another exception in the decoder (a bug) is raised as is."""
        path = str(path)
        keep_torch_threads()
        with self._pool.cond:
            if self._pool.closed:
                raise RuntimeError("VideoPrefetcher is closed")
            job = self._ahead.pop(path, None)
        if job is not None:
            self._pool.bump(job)
        elif self.num_workers > 0:
            job = self._pool.enqueue(self._job(path), urgent=True)
        else:
            job = self._job(path)
            self._pool.run_on_demand(job)
        job.done.wait()
        if job.status == "ok":
            return self._sample(job.value)
        if job.status == "fatal":
            raise RuntimeError(f"{path}: {job.value}")
        raise job.value

    def map(self, paths: Iterable[str]) -> Iterator[tuple[str, Item]]:
        """``(path, VideoSample | VideoError)`` for each of ``paths`` (any iterable, also endless), in
        input order, at most ``depth`` clips in flight. Every occurrence is its own decode (not
        shared with ``prefetch``); an unexpected decoder exception becomes a VideoError too."""
        keep_torch_threads()
        return self._map(iter(paths))

    def _map(self, it: Iterator) -> Iterator[tuple[str, Item]]:
        if self.num_workers <= 0:
            for path in it:
                job = self._job(str(path))
                self._pool.run_on_demand(job)
                yield job.path, self._item(job)
            return
        window: collections.deque = collections.deque()  # jobs in input order
        exhausted = False
        try:
            while True:
                while not exhausted and len(window) < self.depth:
                    try:
                        window.append(self._pool.enqueue(self._job(str(next(it)))))
                    except StopIteration:
                        exhausted = True
                if not window:
                    return
                job = window.popleft()
                yield job.path, self._item(job)
        finally:  # also when the consumer stops early: the clips read ahead are not decoded
            self._pool.cancel(window)

    # -- results ---------------------------------------------------------------------------------

    def _job(self, path: str) -> _Job:
        if self.worker_type == "process":
            return _Job(path, _frames_job, (path, self.cfg, self.sizes))
        return _Job(path, _sample_job, (path, self.cfg, self.sizes, self.device))

    def _sample(self, value) -> VideoSample:
        if self.worker_type == "thread":
            return value
        policy, clip, meta, _ = value  # uint8 frames from a worker process: build the sample here
        if self.device is not None:
            policy, clip = policy.to(self.device, non_blocking=True), clip.to(self.device, non_blocking=True)
        return decoder.build_sample(policy, clip, meta, **self.sizes)

    def _item(self, job: _Job) -> Item:
        job.done.wait()
        if job.status == "ok":
            return self._sample(job.value)
        if job.status == "err":
            return job.value
        if job.status == "exc":
            e = job.value
            return VideoError(job.path, f"unexpected decoder error: {type(e).__name__}: {e}")
        raise RuntimeError(f"{job.path}: {job.value}")

    # -- shutdown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: pending clips are dropped (a ``get`` waiting on one raises RuntimeError), busy
        processes killed, busy threads abandoned; idle workers exit. Idempotent."""
        with self._pool.cond:
            self._ahead.clear()
        self._pool.close()

    def __enter__(self) -> "VideoPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None and not sys.is_finalizing():  # at exit: daemon threads and processes end with us
            try:
                pool.close()
            except Exception:
                pass
