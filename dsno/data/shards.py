"""Shard files: atomic, checksummed, memory-mappable `.npy` arrays.

A shard `i` is two files in the data set folder:
    shard-0000i.x_T.npy     float32 [n, *state_shape]       the noise x_T
    shard-0000i.states.npy  float32 [n, M, *state_shape]    the states at the M output times
    shard-0000i.labels.npy  int64 [n]                        the class labels (conditional data sets only)
Plain NumPy `.npy` (version 1.0 header, little-endian, C order), so `np.load(path, mmap_mode="r")`
reads them and `sha256sum` reproduces the manifest's checksums.

Writing streams batches into `<name>.tmp` (created exclusively and flock-ed while written) while
hashing, fsyncs, then renames onto `<name>`: a file under its final name is always whole.
Reading a shard's bytes (`check_shard_content`) checks its sha256 and that every value is finite.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import itertools
import mmap
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from dsno.atomic import fsync_dir, open_no_follow, refuse_link
from dsno.data.manifest import (
    ROLE_DTYPES,
    CorruptShardError,
    DatasetError,
    FileRecord,
    Manifest,
    ShardRecord,
    load_manifest,
    shard_file_name,
)

NPY_DTYPE = np.dtype("<f4")
TEMP_SUFFIX = ".tmp"
_HASH_CHUNK = 1 << 22


def role_dtype(role: str) -> np.dtype:
    """The dtype of shard file `role`: little-endian float32, int64 for labels."""
    return np.dtype(ROLE_DTYPES[role])


def npy_header(shape: Sequence[int], dtype: np.dtype = NPY_DTYPE) -> bytes:
    """The `.npy` (v1.0) header of a C-ordered little-endian array of `dtype` and `shape`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def npy_file_size(shape: Sequence[int], dtype: np.dtype = NPY_DTYPE) -> int:
    """Bytes of the `.npy` file holding an array of `dtype` (float32 by default) and `shape`."""
    return len(npy_header(shape, dtype)) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class NpyStreamWriter:
    """Write one array of known shape and dtype (float32 by default) in row batches to `<path>.tmp`,
    hashing as it goes.

    `commit()` checks every row arrived, fsyncs and renames to `path`; `abort()` removes the temp
    file. The temp file is created exclusively: a second writer of the same file fails loudly.
    """

    def __init__(self, path: Path, shape: Sequence[int], dtype: np.dtype = NPY_DTYPE):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.temp_path = self.path.with_name(self.path.name + TEMP_SUFFIX)
        self.rows = 0
        self._hash = hashlib.sha256()
        self._bytes = 0
        busy = DatasetError(f"{self.temp_path} exists: another process is writing this shard into the "
                            f"same folder; fix: run one generation per folder (or wait for the other)")
        try:
            self._file = os.fdopen(open_no_follow(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")
        except FileExistsError:
            raise busy from None
        # Held until commit/abort, so a cleaner of stray temps never removes a file being written.
        if not _lock_exclusive(self._file.fileno(), self.temp_path):
            self._file.close()
            raise busy
        self._write(npy_header(self.shape, dtype))

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def write(self, rows: np.ndarray) -> None:
        """Append rows of shape [b, *shape[1:]] (cast to the writer's dtype)."""
        if tuple(rows.shape[1:]) != self.shape[1:]:
            raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit array {self.shape}")
        if self.rows + rows.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows + rows.shape[0]} rows for {self.shape[0]}")
        self._write(memoryview(np.ascontiguousarray(rows, dtype=self.dtype)).cast("B"))
        self.rows += rows.shape[0]

    def commit(self) -> FileRecord:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows} of {self.shape[0]} rows written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        refuse_link(self.path)
        os.replace(self.temp_path, self.path)
        return FileRecord(self.path.name, self._bytes, self._hash.hexdigest())

    def abort(self) -> None:
        self._file.close()
        self.temp_path.unlink(missing_ok=True)


def _lock_exclusive(fd: int, path: Path) -> bool:
    """flock `fd` without waiting; True if it is locked and `path` still names that file
    (True as well where the file system has no flock)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except (BlockingIOError, FileNotFoundError):
        return False
    except OSError:
        return True


def remove_stray_temp(path: Path) -> bool:
    """Delete a shard temp file left by a killed writer; a temp a live writer holds is kept.
    Returns whether it was removed (a link of that name is kept: the writer refuses it by name)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:
            return False
        raise
    try:
        if not _lock_exclusive(fd, path):
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def write_shard(folder: Path, manifest: Manifest, index: int,
                batches: Iterable[tuple[np.ndarray, ...]]) -> ShardRecord:
    """Write shard `index` from batches of one array per role of `manifest.roles` (x_T [b, *shape],
    states [b, M, *shape], and labels [b] for a conditional data set); every file whole or none
    renamed. Returns the record to put in the manifest."""
    writers: dict[str, NpyStreamWriter] = {}
    try:
        for role in manifest.roles:
            writers[role] = NpyStreamWriter(folder / shard_file_name(index, role),
                                            manifest.expected_shape(index, role), role_dtype(role))
        for batch in batches:
            for role, rows in zip(manifest.roles, batch, strict=True):
                writers[role].write(rows)
        files = {role: writers[role].commit() for role in manifest.roles}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    fsync_dir(folder)
    return ShardRecord(index, manifest.expected_count(index), files)


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of a `.npy` file, without reading its data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return shape, dtype, fortran, f.tell()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def scan_npy(path: Path, offset: int, row_elements: int, max_rows: int = 10,
             dtype: np.dtype = NPY_DTYPE) -> tuple[str, list[int], int]:
    """One read of a `.npy` file: (sha256 of the whole file, the first `max_rows` rows holding a NaN
    or inf, how many such rows; none for an integer dtype). `offset` is where the data starts (a
    multiple of 4)."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    bad: list[int] = []
    count, pos, last = 0, 0, -1
    with open(path, "rb", buffering=0) as f:
        while n := _read_full(f, view):
            h.update(view[:n])
            lo = max(offset - pos, 0)
            data = (np.frombuffer(buf, dtype=NPY_DTYPE, count=(n - lo) // 4, offset=lo)
                    if n > lo and dtype.kind == "f" else None)
            if data is not None and not np.isfinite(data).all():
                first = (pos + lo - offset) // 4
                for e in np.flatnonzero(~np.isfinite(data)):
                    row = (first + int(e)) // row_elements
                    if row != last:
                        count, last = count + 1, row
                        if len(bad) < max_rows:
                            bad.append(row)
            pos += n
    return h.hexdigest(), bad, count


def _read_full(f, view: memoryview) -> int:
    """Fill `view` from `f` (short only at the end of the file); returns the bytes read."""
    n = 0
    while n < len(view) and (k := f.readinto(view[n:])):
        n += k
    return n


def check_shard_layout(folder: Path, manifest: Manifest, record: ShardRecord, role: str) -> str | None:
    """What is wrong with a shard file's size or header (no data is read), or None."""
    rec = record.files[role]
    path = folder / rec.name
    expected_shape = manifest.expected_shape(record.index, role)
    expected_dtype = role_dtype(role)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file is missing"
    if size != rec.bytes:
        return f"size {size} bytes, manifest says {rec.bytes}"
    try:
        shape, dtype, fortran, offset = read_npy_header(path)
    except (ValueError, OSError) as e:
        return f"not a readable .npy file ({e})"
    if shape != expected_shape or dtype != expected_dtype or fortran:
        return (f"holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, "
                f"expected {expected_dtype} {expected_shape}")
    if offset + int(np.prod(shape, dtype=np.int64)) * expected_dtype.itemsize != size:
        return f"size {size} bytes does not fit its header (shape {shape})"
    return None


def check_shard_content(folder: Path, manifest: Manifest, record: ShardRecord, role: str) -> str | None:
    """What is wrong with a shard file's bytes (sha256 against the manifest, NaN/inf values), or None.
    Call after `check_shard_layout` found nothing."""
    rec = record.files[role]
    shape = manifest.expected_shape(record.index, role)
    dtype = role_dtype(role)
    offset = rec.bytes - int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    digest, bad, count = scan_npy(folder / rec.name, offset, int(np.prod(shape[1:], dtype=np.int64)), dtype=dtype)
    if digest != rec.sha256:
        return f"sha256 {digest[:16]} differs from the manifest's {rec.sha256[:16]} (first 16 hex digits)"
    if count:
        first = record.index * manifest.shard_size
        rows = ", ".join(str(first + r) for r in bad) + (f" ({count} in all)" if count > len(bad) else "")
        return f"holds NaN/inf values (trajectories {rows}) although its checksum matches"
    return None


def check_shard_file(folder: Path, manifest: Manifest, record: ShardRecord, role: str,
                     full: bool) -> str | None:
    """What is wrong with one shard file, or None. `full` also reads its bytes (sha256, NaN/inf)."""
    what = check_shard_layout(folder, manifest, record, role)
    if what is None and full:
        what = check_shard_content(folder, manifest, record, role)
    return what


def find_bad_shards(folder: str | os.PathLike, manifest: Manifest, full: bool,
                    indices: Iterable[int] | None = None,
                    on_checked: Callable[[int], None] | None = None) -> list[tuple[int, str, str]]:
    """(shard index, file name, problem) for every bad file among the listed shards `indices`
    (default: all listed); `full` checks bytes (sha256, NaN/inf), else sizes and headers only."""
    folder = Path(folder)
    by_index = {s.index: s for s in manifest.shards}
    problems = []
    for i in sorted(by_index if indices is None else set(indices) & set(by_index)):
        for role in manifest.roles:
            what = check_shard_file(folder, manifest, by_index[i], role, full)
            if what is not None:
                problems.append((i, by_index[i].files[role].name, what))
        if on_checked is not None:
            on_checked(i)
    return problems


def verify_dataset(folder: str | os.PathLike, full: bool = True) -> Manifest:
    """Check every listed shard file (sizes, headers; with `full` also sha256 and finite values,
    ignoring any cache) and that the data set is complete. Raises `CorruptShardError` naming each
    bad file; returns the manifest."""
    manifest = load_manifest(folder)
    problems = find_bad_shards(folder, manifest, full)
    listed = {s.index for s in manifest.shards}
    missing = (i for i in range(manifest.num_shards) if i not in listed)
    problems += [(i, shard_file_name(i, "x_T"), "shard is not in the manifest (generation unfinished)")
                 for i in itertools.islice(missing, 50)]
    if problems:
        raise CorruptShardError(folder, sorted(problems))
    return manifest


def map_npy(path: Path, shape: Sequence[int], dtype: np.dtype = NPY_DTYPE) -> np.ndarray:
    """Read-only memory map of a `.npy` file of the given shape and dtype (no data is read).

    Advises the kernel of random access, so a shuffled reader does not pull in read-ahead pages.
    """
    file_shape, file_dtype, fortran, offset = read_npy_header(path)
    if file_shape != tuple(shape) or file_dtype != dtype or fortran:
        raise DatasetError(f"{path} holds {file_dtype} {file_shape}, expected {dtype} {tuple(shape)}; "
                           f"check the data set with verify_dataset({str(path.parent)!r})")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
