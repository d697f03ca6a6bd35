"""One generation per data set folder: a lock file holding the writer's pid and host.

A single-rank run locks `data_gen.lock` exclusively; the ranks of a multi-rank run share it and
each locks its own `data_gen.lock.rank-<r>-of-<W>`. The lock is an flock on the file, which the
kernel drops when the process dies, so a lock left by a killed run (a dead pid) is stale and the
next run takes it over. A refused run names the folder and the pid holding it. A symbolic link
at a lock's name is refused (`LinkRefusedError`), never opened, truncated or removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from dsno.atomic import open_no_follow
from dsno.data.manifest import FolderLockedError, utc_now
from dsno.jsonfile import read_bookkeeping

log = logging.getLogger(__name__)

LOCK_NAME = "data_gen.lock"
HOLDER_MAX_BYTES = 4096     # a holder record is a pid, a host and a time


def rank_lock_name(rank: int, world_size: int) -> str:
    return f"{LOCK_NAME}.rank-{rank:05d}-of-{world_size:05d}"


def read_holder(path: Path) -> dict[str, Any]:
    """The pid/host record in a lock file ({} if empty, unreadable, or not a small JSON object)."""
    return read_bookkeeping(path, max_bytes=HOLDER_MAX_BYTES)


def pid_alive(pid: Any) -> bool:
    """Whether a process with this pid runs on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_locked(path: Path, shared: bool) -> int | None:
    """An fd of `path` holding its flock, or None if another process holds it."""
    while True:
        fd = open_no_follow(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:  # a file system without flock (some network/FUSE mounts)
            log.warning("%s: file locks are not supported here (%s); concurrent runs are not detected", path, e)
            return fd
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed it between our open and flock: lock the new one


def _refusal(folder: Path, path: Path) -> FolderLockedError:
    holders = [read_holder(path)] if not path.name.startswith(f"{LOCK_NAME}.rank-") else []
    for p in sorted(folder.glob(f"{LOCK_NAME}.rank-*")):
        fd = _open_locked(p, shared=True)
        if fd is None:
            holders.append(read_holder(p))
        else:
            os.close(fd)
    host = socket.gethostname()
    held = [h for h in holders if h.get("pid") and (h.get("host") != host or pid_alive(h["pid"]))] or [{}]
    who = ", ".join(f"pid {h.get('pid', '?')} on {h.get('host', '?')}" for h in held)
    return FolderLockedError(
        f"{folder} is being written by another data_gen run ({who}; lock {path.name}); fix: wait for it "
        f"to finish or stop it, then rerun; one generation writes a folder at a time")


def _write_holder(fd: int, rank: int, world_size: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "rank": rank, "world_size": world_size,
              "started": utc_now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)


def _note_takeover(path: Path) -> None:
    old = read_holder(path)
    if old.get("pid"):
        mine = old.get("host") == socket.gethostname()
        state = "no longer running" if (mine and not pid_alive(old["pid"])) else "its lock was released"
        log.warning("took over the stale lock %s of pid %s on %s (%s)", path, old["pid"], old.get("host"), state)


@contextlib.contextmanager
def generation_lock(folder: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Iterator[None]:
    """Hold the folder's generation lock for rank `rank` of `world_size`, or raise
    `FolderLockedError` naming the pid that holds it. The lock files are removed on release
    (the shared one by the last rank out)."""
    folder = Path(folder)
    main = folder / LOCK_NAME
    fds: list[tuple[Path, int]] = []
    try:
        for path, shared in ([(main, False)] if world_size == 1 else
                             [(main, True), (folder / rank_lock_name(rank, world_size), False)]):
            fd = _open_locked(path, shared)
            if fd is None:
                raise _refusal(folder, path)
            fds.append((path, fd))
            if not shared:
                _note_takeover(path)
                _write_holder(fd, rank, world_size)
        yield
    finally:
        for path, fd in reversed(fds):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the shared lock: only if no rank still holds it
                path.unlink(missing_ok=True)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
