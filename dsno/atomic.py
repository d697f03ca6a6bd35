"""Atomic writes: a file appears whole under its final name or not at all, and never through a link.

    atomic_write_bytes(path, data)       # temp file in the same folder, fsync, os.replace
    with atomic_path(path) as tmp: ...   # for writers that need a path (torch.save, np.save)
    fd = open_no_follow(path, flags)     # os.open that refuses a symbolic link at `path`
    claim_output_folder(path, key, ...)  # an out= folder: new, empty or one dsno wrote, and writable

A full disk raises `DiskFullError` naming the path and the free bytes, and leaves no temp file.
A symbolic link at the final name or the temp name is `LinkRefusedError` (one line): dsno never
writes, truncates or replaces the file a link points to, so every byte it writes stays in the
folder it names (links among the parent folders, e.g. runs/ on a larger disk, are followed).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
from pathlib import Path
from typing import Callable, Iterator

from safetensors.torch import save

from dsno.errors import DiskFullError, UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class LinkRefusedError(UserError):
    """A path dsno writes is a symbolic link (which it did not make); nothing was written."""


class UnwritableFolderError(UserError):
    """An output folder cannot be created or written, or holds files dsno did not write."""


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def disk_full_error(path: str | os.PathLike, error: OSError | None = None) -> DiskFullError:
    """The one-line error for ENOSPC / EDQUOT / EFBIG (`error`, when given) while writing `path`."""
    too_big = error is not None and error.errno == errno.EFBIG
    return DiskFullError(f"disk full while writing {path}: {free_bytes(path):,} bytes free there"
                         f"{' (the file is larger than this file system or ulimit -f allows)' if too_big else ''}; "
                         "free space or point run_dir= at a larger disk, then run the command again")


def check_room(path: str | os.PathLike, size: int) -> None:
    """Raise the OSError (EFBIG / ENOSPC) a write of `size` bytes at `path` would meet: over this
    process's file-size limit (ulimit -f) or the free bytes there. For writers that cannot fail
    cleanly mid-file; the caller's disk-full handling names the path."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    for code, full in ((errno.EFBIG, limit != resource.RLIM_INFINITY and size > limit),
                       (errno.ENOSPC, size > free_bytes(path))):
        if full:
            raise OSError(code, os.strerror(code), str(path))


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def link_refused(path: str | os.PathLike) -> LinkRefusedError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return LinkRefusedError(f"refusing to write {path}: it is a symbolic link{target}, which dsno did not make and "
                            "never writes through; remove the link (its target is untouched), then run the command "
                            "again")


def refuse_link(path: str | os.PathLike) -> None:
    """`LinkRefusedError` if `path` is a symbolic link (a dangling one too)."""
    if os.path.islink(path):
        raise link_refused(path)


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """`os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode)`: a link at `path` is `LinkRefusedError`
    (with O_CREAT | O_EXCL too, where the kernel reports it as EEXIST)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EEXIST) and os.path.islink(path):
            raise link_refused(path) from None
        raise


def make_folder(path: str | os.PathLike) -> Path:
    """mkdir -p `path`, refusing a link at it (so files written inside stay in it)."""
    path = Path(path)
    refuse_link(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _create_temp(tmp: Path) -> None:
    """Create `tmp` empty and exclusively; a stale regular file of that name (a killed writer's) is
    replaced, a link is refused."""
    try:
        fd = open_no_follow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        tmp.unlink()
        fd = open_no_follow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.close(fd)


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
    that name); default `.NAME.PID.tmp`. The temp file is created (empty, not through a link)
    before it is yielded; a link at `path` or at the temp name is `LinkRefusedError`. On any error
    the temp file is removed; ENOSPC / EDQUOT / EFBIG become DiskFullError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_link(path)
    tmp = path.with_name(path.name + temp_suffix) if temp_suffix else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    created = False
    try:
        _create_temp(tmp)
        created = True
        yield tmp
        fd = open_no_follow(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        refuse_link(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        if created:
            tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise
    except BaseException:
        if created:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, temp_suffix: str | None = None) -> None:
    """Write `data` to `path` atomically (see module doc)."""
    with atomic_path(path, temp_suffix) as tmp:
        write_bytes_no_follow(tmp, data, exclusive=False)


def write_bytes_no_follow(path: str | os.PathLike, data: bytes | memoryview, exclusive: bool = True) -> None:
    """Write `data` to `path`, never through a link; exclusive: `path` must not exist yet (for a
    file inside a folder this process just made), else an existing regular file is truncated."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    with os.fdopen(open_no_follow(path, flags), "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, temp_suffix: str | None = None) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode(), temp_suffix)


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> contiguous tensor) as a .safetensors file atomically. The file is
    serialised in memory first: safetensors' own file writer reports a full disk as a SafetensorError
    traceback, this one as DiskFullError."""
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def prove_writable(folder: str | os.PathLike) -> None:
    """mkdir -p `folder` and create and remove a probe file in it (never through a link); the
    OSError of a read-only, full or impossible place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    os.close(open_no_follow(probe, os.O_WRONLY | os.O_CREAT))
    probe.unlink()


def claim_output_folder(path: str | os.PathLike, key: str, foreign: Callable[[Path], list[str]],
                        create: bool) -> Path:
    """Check that the output folder `path` (the option `key`, e.g. "out") may take dsno's files, and
    create it (`create`) or its parent. It must not be a link or a file, and must be new, empty or
    one dsno wrote (`foreign(path)`: the entries that say otherwise, [] for none), so no user file
    is replaced or removed; the folder it is created in must be writable (proved with a probe
    file). Anything else is one `UnwritableFolderError` / `LinkRefusedError` line. Returns `path`."""
    path = Path(path)
    refuse_link(path)
    if path.exists() and not path.is_dir():
        raise UnwritableFolderError(f"{key}={path} is a file, not a folder; point {key}= at a new or empty folder")
    if path.is_dir():
        others = sorted(foreign(path))
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise UnwritableFolderError(f"{key}={path} is not empty and not a folder dsno wrote (it holds {shown}); "
                                        f"nothing was changed: point {key}= at a new or empty folder")
    folder = path if create else path.parent
    try:
        prove_writable(folder)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(folder, e) from None
        raise UnwritableFolderError(f"cannot write {key}={path} ({e.strerror or e}); point {key}= at a folder "
                                    "you can write to") from None
    return path
