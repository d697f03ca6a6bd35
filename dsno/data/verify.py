"""Shard verification before first use: sha256 and finite values, once per file version.

`ShardVerifier.ensure(i)` reads shard i's files once (`check_shard_content`) before its bytes
are used and raises `CorruptShardError` naming the bad file. What was verified is remembered in
the process and in the folder's `verified.json` (written atomically; a missing, damaged or
unwritable cache only means re-verifying). A cache entry holds a file's (name, bytes, mtime_ns,
ctime_ns, inode, device, manifest sha256): any write, `touch`, copy or regeneration of the file
changes one of them, so the file is verified again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from dsno.data.manifest import CorruptShardError, Manifest, ShardRecord, write_json_atomic
from dsno.data.shards import check_shard_content, check_shard_layout
from dsno.jsonfile import read_json_file

log = logging.getLogger(__name__)

CACHE_NAME = "verified.json"
CACHE_FORMAT = 1
_FLUSH_EVERY_S = 2.0


def file_key(path: Path, sha256: str) -> list[Any] | None:
    """What identifies one version of a file for the cache, or None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, sha256]


class VerifiedCache:
    """The folder's record of verified shard files: name -> `file_key`."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / CACHE_NAME
        self._entries: dict[str, list[Any]] = {}
        self._seen: list[Any] | None = None
        self._pending: dict[str, list[Any]] = {}
        self._flushed = time.monotonic()

    def _reload(self) -> None:
        key = file_key(self.path, "")
        if key == self._seen:
            return
        self._seen, self._entries = key, {}
        try:
            d = read_json_file(self.path, ValueError, "it is only a cache", expect=dict)
            files = d["files"] if d.get("format_version") == CACHE_FORMAT else {}
            self._entries = {str(k): v for k, v in files.items() if isinstance(v, list)}
        except (ValueError, TypeError, AttributeError, KeyError):     # a damaged cache costs a re-check
            pass

    def holds(self, name: str, key: list[Any]) -> bool:
        if self._pending.get(name) == key:
            return True
        self._reload()
        return self._entries.get(name) == key

    def add(self, name: str, key: list[Any]) -> None:
        self._pending[name] = key
        if time.monotonic() - self._flushed >= _FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Merge the new entries into the file (atomically); errors only cost a re-check later."""
        if not self._pending:
            return
        self._seen = None
        self._reload()
        merged = {**self._entries, **self._pending}
        try:
            write_json_atomic(self.path, {"format_version": CACHE_FORMAT, "files": merged},
                              temp_suffix=f".tmp.{os.getpid()}")
        except OSError as e:
            log.debug("could not write %s (%s); verification is remembered in this process only", self.path, e)
        self._entries, self._pending, self._flushed = merged, {}, time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pending"], state["_seen"] = {}, None
        return state


class ShardVerifier:
    """Verifies shards of one data set lazily, each at most once per process.

    use_cache: trust (and extend) the folder's `verified.json`; False re-reads every file once.
    `seconds` is the time spent reading and hashing.
    """

    def __init__(self, folder: str | os.PathLike, manifest: Manifest, use_cache: bool = True):
        self.folder = Path(folder)
        self.manifest = manifest
        self.cache = VerifiedCache(self.folder) if use_cache else None
        self._records = {s.index: s for s in manifest.shards}
        self._done: set[int] = set()
        self.seconds = 0.0

    def problems(self, index: int) -> list[tuple[int, str, str]]:
        """(index, file name, what) for each bad file of listed shard `index`; records good ones."""
        rec: ShardRecord = self._records[index]
        found = []
        for role in self.manifest.roles:
            name = rec.files[role].name
            what = check_shard_layout(self.folder, self.manifest, rec, role)
            key = file_key(self.folder / name, rec.files[role].sha256)
            if what is None and not (self.cache is not None and key is not None and self.cache.holds(name, key)):
                start = time.perf_counter()
                what = check_shard_content(self.folder, self.manifest, rec, role)
                self.seconds += time.perf_counter() - start
                if what is None and self.cache is not None and key is not None:
                    self.cache.add(name, key)
            if what is not None:
                found.append((index, name, what))
        if not found:
            self._done.add(index)
        return found

    @property
    def all_verified(self) -> bool:
        return len(self._done) == len(self._records)

    def ensure(self, index: int) -> None:
        """Return once shard `index` is verified; `CorruptShardError` naming its bad file otherwise."""
        if index in self._done:
            return
        found = self.problems(index)
        if found:
            raise CorruptShardError(self.folder, found)
        if self.cache is not None and self.all_verified:
            self.cache.flush()

    def check(self, indices: Iterable[int]) -> list[tuple[int, str, str]]:
        """Problems of all listed shards among `indices` (the cache is written at the end)."""
        found = [p for i in sorted(set(indices) & set(self._records)) if i not in self._done
                 for p in self.problems(i)]
        if self.cache is not None:
            self.cache.flush()
        return found

    def flush(self) -> None:
        if self.cache is not None:
            self.cache.flush()
