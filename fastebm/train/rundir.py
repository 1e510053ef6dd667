"""One run per run folder: ``run.output_dir/fastebm.lock``.

The first thing a run does with its folder (rank 0, before it writes anything there) is to take an
exclusive lock on ``fastebm.lock`` (``fcntl.lockf``: a POSIX record lock, which the kernel drops when
the process dies however it dies, and which NFS v4 / lockd share between hosts) and write who holds
it: ``{"pid", "host", "started", "command"}``.

- A second run on the same folder finds the lock held and refuses at once (``RunDirInUse``, exit 3),
  naming the holder's pid, host, start time and command.
- A lock file that names a process but is not locked was left by a run that died without cleaning
  up (killed, crashed, the machine rebooted): the new run takes it over with a warning naming it.
- On a clean exit the file is emptied and unlocked (an empty ``fastebm.lock`` is free).

Where the filesystem has no locking (``ENOLCK`` / ``EOPNOTSUPP``), the file's content decides: a
holder on this host whose pid is alive, or on another host, refuses (delete the file if that run is
gone); a dead pid on this host is taken over.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Optional

log = logging.getLogger("fastebm")

LOCK = "fastebm.lock"

_held: dict[str, int] = {}  # realpath of a lock file -> this process's open descriptor holding the lock


class RunDirInUse(RuntimeError):
    """Another live run holds the run folder's lock."""


def acquire_run_lock(run_dir: str) -> str:
    """Lock ``run_dir`` for this process (idempotent); returns the lock file's path.

    RunDirInUse when another process holds it. The lock is released by ``release_run_lock``, at exit
    (atexit), or by the kernel when the process dies.
    """
    path = os.path.join(run_dir, LOCK)
    key = os.path.realpath(path)
    if key in _held:  # this process locked it already (an earlier trainer on this folder)
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locking = True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            holder = _read(fd)
            os.close(fd)  # this process holds no lock on the file: closing drops nothing
            raise RunDirInUse(_in_use(run_dir, path, holder)) from None
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        locking = False
        log.warning("%s: the filesystem does not support file locks; telling runs apart by pid and host", path)
    holder = _read(fd)
    if holder and not _ours(holder):
        if not locking and _maybe_alive(holder):
            os.close(fd)
            raise RunDirInUse(_in_use(run_dir, path, holder))
        log.warning("%s: taking over the lock of a run that is no longer running (pid %s on %s, started %s)",
                    path, holder.get("pid"), holder.get("host"), holder.get("started"))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    _held[key] = fd
    atexit.register(release_run_lock, run_dir)
    return path


def release_run_lock(run_dir: str) -> None:
    """Empty and unlock ``run_dir``'s lock if this process holds it (no-op otherwise)."""
    fd = _held.pop(os.path.realpath(os.path.join(run_dir, LOCK)), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
        fcntl.lockf(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    finally:
        os.close(fd)


def lock_holder(run_dir: str) -> Optional[dict]:
    """What ``run_dir``'s lock file says (None when empty or missing). Read only: takes no lock."""
    try:
        with open(os.path.join(run_dir, LOCK)) as f:
            return _parse(f.read())
    except FileNotFoundError:
        return None


def _read(fd: int) -> Optional[dict]:
    return _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))


def _parse(text: str) -> Optional[dict]:
    if not text.strip():
        return None
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": "?", "command": text.strip()[:200]}
    return d if isinstance(d, dict) else None


def _ours(holder: dict) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _maybe_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another host: no way to tell
    try:
        os.kill(int(holder.get("pid")), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def _in_use(run_dir: str, path: str, holder: Optional[dict]) -> str:
    h = holder or {}
    return (f"run.output_dir {run_dir} is in use by another fastebm run: pid {h.get('pid', '?')} on host "
            f"{h.get('host', '?')}, started {h.get('started', '?')} ({h.get('command', '?')}). Wait for it to "
            f"finish, stop it, or choose another run.output_dir (two runs in one folder overwrite each other's "
            f"checkpoints and metrics). If that run is gone for good and the lock survived it (a lock shared "
            f"over NFS), delete {path}")
