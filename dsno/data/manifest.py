"""The manifest of a trajectory data set: what was generated (fingerprint) and which shards are whole.

A data set is a folder holding `manifest.json` and shard files (see `dsno.data.shards`).
The manifest is JSON, `format_version` 2 (version 1 named the fingerprint's `state_shape` `sample_shape`
and its solver's `solver_schedule_sha256` `schedule_sha256`; such a manifest still reads, under the new names):

    fingerprint   {teacher, solver, grid, times, state_shape, dtype, ...}: what the data means
    seed, num_trajectories, shard_size: which trajectories (noise of trajectory g depends on (seed, g))
    shards        [{index, count, files: {role: {name, bytes, sha256}}}], sorted by index; the roles
                  are x_T and states, and labels (int64 [n]) when the fingerprint has `labels`
    created, updated (ISO 8601, UTC), complete, noise (how x_T was drawn), torch_version

It only ever lists shards whose files are whole: writers replace it atomically after each shard.
This module also defines the error types of `dsno.data` and the fingerprint comparison.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dsno.atomic import atomic_write_text
from dsno.errors import UserError
from dsno.jsonfile import excerpt, read_json_file
from dsno.renamed import read_renamed_keys

FORMAT_VERSION = 2
RENAMED_FINGERPRINT_KEYS = {"sample_shape": ("state_shape", 2)}    # old key -> (new key, the version that renamed it)
RENAMED_SOLVER_KEYS = {"schedule_sha256": ("solver_schedule_sha256", 2)}    # the same, in fingerprint.solver (usf)
MANIFEST_NAME = "manifest.json"
ROLES = ("x_T", "states")
LABELS = "labels"            # the class label of each trajectory: a role only of a conditional data set
ALL_ROLES = ROLES + (LABELS,)
ROLE_DTYPES = {"x_T": "<f4", "states": "<f4", LABELS: "<i8"}
DTYPE = "float32"
FINGERPRINT_REQUIRED = ("teacher", "solver", "grid", "times")
FLOAT_RTOL = 1e-9
FLOAT_ATOL = 1e-12
GENERATE_HINT = "python -m data_gen experiment=<name>"
REPAIR_HINT = "python -m data_gen experiment=<name> <same overrides> data.repair=true"


class DatasetError(UserError):
    """Base class of every error about a trajectory data set."""


class DatasetNotFoundError(DatasetError):
    """The folder or its manifest does not exist."""


class CorruptShardError(DatasetError):
    """One or more shard files are missing, truncated, malformed, fail their checksum or hold
    non-finite values. `problems` lists (shard index, file name, what is wrong)."""

    SHOWN = 5

    def __init__(self, folder: str | os.PathLike, problems: Sequence[tuple[int, str, str]]):
        self.folder = str(folder)
        self.problems = list(problems)
        shown = "; ".join(f"{name} (shard {i}): {what}" for i, name, what in self.problems[:self.SHOWN])
        more = f"; and {len(self.problems) - self.SHOWN} more" if len(self.problems) > self.SHOWN else ""
        super().__init__(
            f"data set in {self.folder} has {len(self.problems)} bad shard file(s): {shown}{more}. "
            f"Fix: regenerate only the bad shards, bit for bit: `{REPAIR_HINT}` "
            f"(or generate_dataset(..., repair=True)).")


class FingerprintMismatchError(DatasetError):
    """A data set was made by another teacher / solver / grid / times / shape than expected.

    `differences` lists (key, dataset value, expected value).
    """

    def __init__(self, message: str, differences: Sequence[tuple[str, Any, Any]]):
        self.differences = list(differences)
        super().__init__(message)


class InsufficientDiskSpaceError(DatasetError):
    """The folder's file system has less free space than the planned shards need."""


class NonFiniteStatesError(DatasetError):
    """The teacher's solve returned NaN or inf states; nothing of that shard was written."""


class FolderLockedError(DatasetError):
    """Another generation run holds the data set folder's lock."""


class DatasetTooLargeError(DatasetError):
    """The planned data set has more shards than one manifest may list."""


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class FileRecord:
    """One shard file: its name inside the data set folder, size in bytes, sha256 (hex)."""

    name: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class ShardRecord:
    """A whole shard: trajectories [index * shard_size, index * shard_size + count)."""

    index: int
    count: int
    files: dict[str, FileRecord]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "count": self.count,
                "files": {role: record.to_dict() for role, record in self.files.items()}}


def shard_file_name(index: int, role: str) -> str:
    """Canonical file name of a shard file, e.g. `shard-00003.states.npy`."""
    if role not in ALL_ROLES:
        raise ValueError(f"unknown shard file role {role!r}; use one of {ALL_ROLES}")
    return f"shard-{index:05d}.{role}.npy"


def num_shards_of(num_trajectories: int, shard_size: int) -> int:
    """Number of shards: full shards of `shard_size`, the last one possibly smaller."""
    return -(-num_trajectories // shard_size)


@dataclass
class Manifest:
    """In-memory form of `manifest.json`. Build with `Manifest.new`, read with `load_manifest`."""

    fingerprint: dict[str, Any]
    seed: int
    num_trajectories: int
    shard_size: int
    shards: list[ShardRecord] = field(default_factory=list)
    created: str = ""
    updated: str = ""
    complete: bool = False
    noise: str = ""
    torch_version: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def new(cls, fingerprint: Mapping[str, Any], seed: int, num_trajectories: int, shard_size: int,
            noise: str = "", torch_version: str = "") -> "Manifest":
        now = utc_now()
        return cls(dict(fingerprint), seed, num_trajectories, shard_size, [], now, now, False, noise,
                   torch_version)

    # --- what the data is
    @property
    def times(self) -> list[float]:
        """The M output times of every stored trajectory."""
        return [float(t) for t in self.fingerprint["times"]]

    @property
    def num_times(self) -> int:
        return len(self.fingerprint["times"])

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one solver state, e.g. (C, H, W); PSLD's augmented (2C, H, W)."""
        return tuple(int(s) for s in self.fingerprint["state_shape"])

    @property
    def roles(self) -> tuple[str, ...]:
        """The files of each shard: x_T and states, and labels when the data set is conditional."""
        return ALL_ROLES if LABELS in self.fingerprint else ROLES

    @property
    def num_shards(self) -> int:
        """Planned number of shards (whole or not)."""
        return num_shards_of(self.num_trajectories, self.shard_size)

    def expected_count(self, index: int) -> int:
        """Trajectories in shard `index` (arithmetic: no per-shard list, whatever the count)."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard index {index} out of range [0, {self.num_shards})")
        return min(self.shard_size, self.num_trajectories - index * self.shard_size)

    def expected_shape(self, index: int, role: str) -> tuple[int, ...]:
        """Array shape of shard file `role`: [n, *state_shape], [n, M, *state_shape] or [n] (labels)."""
        n = self.expected_count(index)
        if role == LABELS:
            return (n,)
        return (n, *self.state_shape) if role == "x_T" else (n, self.num_times, *self.state_shape)

    def layout(self) -> dict[str, Any]:
        """What must match for a rerun to resume this data set (not just the fingerprint)."""
        return {"fingerprint": self.fingerprint, "seed": self.seed,
                "num_trajectories": self.num_trajectories, "shard_size": self.shard_size}

    # --- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "fingerprint": self.fingerprint,
                "seed": self.seed, "num_trajectories": self.num_trajectories,
                "shard_size": self.shard_size, "complete": self.complete,
                "created": self.created, "updated": self.updated, "noise": self.noise,
                "torch_version": self.torch_version,
                "shards": [s.to_dict() for s in sorted(self.shards, key=lambda s: s.index)]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "manifest") -> "Manifest":
        """Parse and validate a manifest; `source` names it in error messages."""
        if not isinstance(d, Mapping):
            raise DatasetError(f"{source}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise DatasetError(f"{source}: unsupported format_version {version!r}; "
                               f"this dsno reads format_version {FORMAT_VERSION} (and older)")
        for key in ("fingerprint", "seed", "num_trajectories", "shard_size", "shards"):
            if key not in d:
                raise DatasetError(f"{source}: missing key {key!r}")
        if isinstance(d["fingerprint"], Mapping):
            fingerprint = read_renamed_keys(d["fingerprint"], version, RENAMED_FINGERPRINT_KEYS, f"{source} fingerprint",
                                            DatasetError)
            if isinstance(fingerprint.get("solver"), Mapping):
                fingerprint["solver"] = read_renamed_keys(fingerprint["solver"], version, RENAMED_SOLVER_KEYS,
                                                          f"{source} fingerprint.solver", DatasetError)
            d = {**d, "fingerprint": fingerprint}
        if not isinstance(d["shards"], list):
            raise DatasetError(f"{source}: 'shards' must be a list of shard records, not a JSON "
                               f"{type(d['shards']).__name__}")
        try:
            fingerprint = normalize_fingerprint(d["fingerprint"])
            seed = _int(d["seed"], "seed", minimum=0)
            num = _int(d["num_trajectories"], "num_trajectories", minimum=1)
            size = _int(d["shard_size"], "shard_size", minimum=1)
        except ValueError as e:
            raise DatasetError(f"{source}: {e}") from None
        m = cls(fingerprint, seed, num, size, [], str(d.get("created", "")), str(d.get("updated", "")),
                bool(d.get("complete", False)), str(d.get("noise", "")), str(d.get("torch_version", "")))
        m.shards = [_parse_shard(s, m, source) for s in d["shards"]]
        indices = [s.index for s in m.shards]
        if len(set(indices)) != len(indices):
            raise DatasetError(f"{source}: a shard index is listed twice: {sorted(indices)}")
        m.shards.sort(key=lambda s: s.index)
        if m.complete and len(m.shards) != m.num_shards:
            raise DatasetError(f"{source}: marked complete but lists {len(m.shards)} of "
                               f"{m.num_shards} shards")
        return m


def _parse_shard(s: Any, m: Manifest, source: str) -> ShardRecord:
    # Names are never taken from the file: a data set from elsewhere must not point outside its folder.
    try:
        index = _int(s["index"], "shard index", minimum=0)
        if index >= m.num_shards:
            raise ValueError(f"shard index {index} out of range [0, {m.num_shards})")
        count = _int(s["count"], f"shard {index} count", minimum=1)
        if count != m.expected_count(index):
            raise ValueError(f"shard {index} count {count}, expected {m.expected_count(index)}")
        files = {}
        for role in m.roles:
            f = s["files"][role]
            name = shard_file_name(index, role)
            if f["name"] != name:
                raise ValueError(f"shard {index} {role} file is named {f['name']!r}, expected {name!r}")
            digest = str(f["sha256"])
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"shard {index} {role} sha256 is not 64 hex digits: {digest!r}")
            files[role] = FileRecord(name, _int(f["bytes"], f"{name} bytes", minimum=1), digest)
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{source}: malformed shard entry {excerpt(s)} ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise DatasetError(f"{source}: {e}") from None
    return ShardRecord(index, count, files)


def _int(v: Any, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- files


def write_json_atomic(path: Path, obj: Any, temp_suffix: str = ".tmp") -> None:
    """Write JSON to `path + temp_suffix`, fsync, rename over `path`, fsync the folder."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n", temp_suffix)


def read_manifest_file(path: Path) -> Manifest:
    if not path.is_file():
        raise DatasetNotFoundError(f"no manifest at {path}")
    d = read_json_file(path, DatasetError, f"it was not written by dsno or is damaged. Delete the folder and "
                                           f"regenerate: `{GENERATE_HINT}`", expect=dict)
    try:
        return Manifest.from_dict(d, source=str(path))
    except DatasetError as e:
        raise DatasetError(f"{e}. It was not written by this dsno or is damaged; fix: delete the folder "
                           f"and regenerate: `{GENERATE_HINT}`") from None


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read `folder/manifest.json`, with an error that says how to make it if it is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"trajectory data set folder {folder} does not exist. "
                                   f"Make it with `{GENERATE_HINT}` (it writes to data.dir).")
    if not (folder / MANIFEST_NAME).is_file():
        raise DatasetNotFoundError(
            f"{folder} has no {MANIFEST_NAME}, so it is not a trajectory data set (or its "
            f"generation has not finished a shard yet). Make or resume it with `{GENERATE_HINT}`.")
    return read_manifest_file(folder / MANIFEST_NAME)


# ---------------------------------------------------------------- fingerprint


def to_jsonable(obj: Any, path: str = "fingerprint") -> Any:
    """Plain JSON types from tuples, NumPy scalars/arrays, tensors and str / int subclasses (Enum
    choices: their value); error naming the bad key."""
    if obj is None or type(obj) in (bool, int, str):
        return obj
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{path} is {obj}; only finite numbers can be stored")
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{path} has a non-string key {k!r}; JSON keys are strings")
            out[k] = to_jsonable(v, f"{path}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "tolist"):  # NumPy scalars / arrays, torch tensors
        return to_jsonable(obj.tolist(), path)
    raise ValueError(f"{path} has a value of type {type(obj).__name__} ({obj!r}); "
                     f"use JSON types (dict, list, str, int, float, bool, None)")


def normalize_fingerprint(fingerprint: Mapping[str, Any],
                          state_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Validate a fingerprint and fill in `state_shape` and `dtype`.

    Needs teacher (dict), solver (dict), grid (floats), times (M >= 1 floats); other keys are
    kept. `state_shape`, when given, must agree with one already in the fingerprint.
    """
    if not isinstance(fingerprint, Mapping):
        raise ValueError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    fp = to_jsonable(fingerprint)
    missing = [k for k in FINGERPRINT_REQUIRED if k not in fp]
    if missing:
        raise ValueError(f"fingerprint is missing {missing}; it needs {list(FINGERPRINT_REQUIRED)} "
                         f"(teacher: e.g. teacher.fingerprint(); solver: name/order/options)")
    for key in ("teacher", "solver"):
        if not isinstance(fp[key], dict):
            raise ValueError(f"fingerprint.{key} must be a dict, got {fp[key]!r}")
    for key in ("grid", "times"):
        v = fp[key]
        if not (isinstance(v, list) and v and all(isinstance(t, (int, float))
                                                   and not isinstance(t, bool) for t in v)):
            raise ValueError(f"fingerprint.{key} must be a non-empty list of numbers, got {v!r}")
        fp[key] = [float(t) for t in v]
    if state_shape is not None:
        shape = check_state_shape(state_shape)
        if "state_shape" in fp and list(fp["state_shape"]) != shape:
            raise ValueError(f"fingerprint.state_shape {fp['state_shape']} differs from "
                             f"state_shape {shape}")
        fp["state_shape"] = shape
    if "state_shape" not in fp:
        raise ValueError("fingerprint needs state_shape (or pass state_shape=...)")
    fp["state_shape"] = check_state_shape(fp["state_shape"])
    fp.setdefault("dtype", DTYPE)
    if fp["dtype"] != DTYPE:
        raise ValueError(f"fingerprint.dtype {fp['dtype']!r} is not supported; data is stored as {DTYPE!r}")
    return fp


def check_state_shape(shape: Any) -> list[int]:
    if not (isinstance(shape, (list, tuple)) and shape
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"state_shape must be a non-empty sequence of positive ints, e.g. (1, 16, 16), "
                         f"got {shape!r}")
    return list(shape)


def make_fingerprint(*, teacher: Mapping[str, Any], solver: Mapping[str, Any], grid: Iterable[float],
                     times: Iterable[float], state_shape: Sequence[int], **extra: Any) -> dict[str, Any]:
    """The fingerprint of a data set: teacher (e.g. `teacher.fingerprint()`), solver
    {name, order, options}, full solver grid, the M output times, state_shape, extra keys."""
    return normalize_fingerprint({"teacher": dict(teacher), "solver": dict(solver),
                                  "grid": [float(t) for t in grid], "times": [float(t) for t in times],
                                  **extra}, state_shape)


def differences(actual: Any, expected: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(key path, actual, expected) for every place where the two JSON values differ.

    Numbers compare with relative tolerance 1e-9 (absolute 1e-12); lists element-wise.
    """
    if isinstance(actual, Mapping) and isinstance(expected, Mapping):
        out = []
        for k in list(actual) + [k for k in expected if k not in actual]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in expected:
                out.append((sub, actual[k], _MISSING))
            elif k not in actual:
                out.append((sub, _MISSING, expected[k]))
            else:
                out += differences(actual[k], expected[k], sub)
        return out
    if isinstance(actual, list) and isinstance(expected, list):
        if len(actual) != len(expected):
            return [(path, actual, expected)]
        bad = [i for i, (a, e) in enumerate(zip(actual, expected)) if differences(a, e)]
        if not bad:
            return []
        return [(f"{path}[{bad[0]}]" + (f" (and {len(bad) - 1} more entries)" if len(bad) > 1 else ""),
                 actual[bad[0]], expected[bad[0]])]
    if _is_number(actual) and _is_number(expected):
        if math.isclose(actual, expected, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL):
            return []
        return [(path, actual, expected)]
    if type(actual) is type(expected) and actual == expected:
        return []
    return [(path, actual, expected)]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_differences(diffs: Sequence[tuple[str, Any, Any]], labels: tuple[str, str]) -> str:
    """The differences on one line: `key: <label0> value vs <label1> value; ...`."""
    return "; ".join(f"{key}: {labels[0]} {_short(a)} vs {labels[1]} {_short(e)}" for key, a, e in diffs)


def _short(v: Any, limit: int = 160) -> str:
    if isinstance(v, list) and len(v) > 8:
        text = f"[{', '.join(map(repr, v[:3]))}, ..., {', '.join(map(repr, v[-2:]))}] ({len(v)} values)"
    else:
        text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_fingerprint(manifest_or_dir: Manifest | str | os.PathLike, expected: Mapping[str, Any],
                      where: str | None = None) -> None:
    """Raise `FingerprintMismatchError` if the data set's fingerprint differs from `expected`.

    Only the top-level keys present in `expected` are compared (so a trainer can require just
    `times` and `state_shape`); nested values are compared in full.
    """
    if isinstance(manifest_or_dir, Manifest):
        manifest, where = manifest_or_dir, where or "the data set"
    else:
        manifest, where = load_manifest(manifest_or_dir), where or str(manifest_or_dir)
    expected = to_jsonable(expected)
    actual = {k: manifest.fingerprint.get(k, _MISSING) for k in expected}
    diffs = differences(actual, expected)
    if diffs:
        raise FingerprintMismatchError(
            f"{where} was made differently from what is expected: "
            f"{format_differences(diffs, ('dataset', 'expected'))}. "
            f"Fix: use a data set generated with the expected teacher/solver/times, or regenerate one.",
            diffs)
