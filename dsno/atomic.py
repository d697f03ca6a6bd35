"""Atomic writes: a file appears whole under its final name or not at all.

    atomic_write_bytes(path, data)       # temp file in the same folder, fsync, os.replace
    with atomic_path(path) as tmp: ...   # for writers that need a path (torch.save, np.save)

A full disk raises `DiskFullError` naming the path and the free bytes, and leaves no temp file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from dsno.errors import DiskFullError


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def disk_full_error(path: str | os.PathLike) -> DiskFullError:
    return DiskFullError(f"disk full while writing {path}: {free_bytes(path):,} bytes free there; "
                         "free space or point run_dir= at a larger disk, then run the command again")


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so a rename inside it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, temp_suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it, rename it onto `path` and fsync the
    folder. temp_suffix: the temp file is `path + temp_suffix` (for callers whose cleanup knows
    that name); default `.NAME.PID.tmp`. On any error the temp file is removed; ENOSPC becomes
    DiskFullError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + temp_suffix) if temp_suffix else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(path) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, temp_suffix: str | None = None) -> None:
    """Write `data` to `path` atomically (see module doc)."""
    with atomic_path(path, temp_suffix) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, temp_suffix: str | None = None) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode(), temp_suffix)
