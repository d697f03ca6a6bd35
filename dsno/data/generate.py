"""The generation driver: teacher trajectories into a resumable, rank-sharded data set.

Trajectory g (0 <= g < num_trajectories) lives in shard g // shard_size. Its noise depends on
(seed, g) only (`trajectory_noise`), so an interrupted-and-resumed run, a repaired shard and a
run over any number of ranks all write the same bytes (on the same CPU and software).

Rank r of W writes the shards i with i % W == r. With W == 1 the driver updates `manifest.json`
after each shard; with W > 1 each rank updates its part `manifest.part-<r>-of-<W>.json`, and the
parts are merged into `manifest.json` once every shard is whole (by rank 0 after a barrier when
torch.distributed is initialised, else by whichever rank finds all parts done).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import struct
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from dsno.data.manifest import (
    MANIFEST_NAME,
    ROLES,
    CorruptShardError,
    DatasetError,
    DatasetNotFoundError,
    FingerprintMismatchError,
    InsufficientDiskSpaceError,
    Manifest,
    ShardRecord,
    differences,
    format_differences,
    normalize_fingerprint,
    read_manifest_file,
    shard_counts,
    utc_now,
    write_json_atomic,
)
from dsno.data.shards import TEMP_SUFFIX, find_bad_shards, npy_file_size, write_shard

log = logging.getLogger(__name__)

NOISE_DESCRIPTION = ("x_T of trajectory g = torch.randn(sample_shape, dtype=float32, generator="
                     "torch.Generator().manual_seed(blake2b-64(seed, g)))")
_PART_RE = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json")
_MANIFEST_TEMP_RE = re.compile(r"manifest(\.part-\d+-of-\d+)?\.json\.tmp\.r(\d+)")

Solve = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- noise


def noise_seed(seed: int, index: int) -> int:
    """64-bit generator seed of trajectory `index` under data set `seed` (BLAKE2b of both)."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed, index), digest_size=8, person=b"dsno.noise").digest()
    return int.from_bytes(digest, "little")


def trajectory_noise(seed: int, start: int, stop: int, sample_shape: Sequence[int]) -> torch.Tensor:
    """x_T of trajectories [start, stop): float32 [stop - start, *sample_shape], on the CPU.

    Each trajectory has its own generator, so the values do not depend on batching or sharding.
    """
    out = torch.empty((stop - start, *sample_shape), dtype=torch.float32)
    gen = torch.Generator()
    for j, g in enumerate(range(start, stop)):
        gen.manual_seed(noise_seed(seed, g))
        torch.randn(tuple(sample_shape), generator=gen, out=out[j])
    return out


# ---------------------------------------------------------------- ranks


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): as given, else torch.distributed's, else env RANK/WORLD_SIZE, else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither, got rank={rank}, world_size={world_size}")
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            rank, world_size = 0, 1
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _uses_process_group(rank: int, world_size: int) -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and (torch.distributed.get_rank(), torch.distributed.get_world_size()) == (rank, world_size))


def part_name(rank: int, world_size: int) -> str:
    return f"manifest.part-{rank:05d}-of-{world_size:05d}.json"


# ---------------------------------------------------------------- what is on disk


def _existing_sources(folder: Path, target: Manifest) -> list[tuple[str, Manifest]]:
    """(file name, manifest) for manifest.json and every part file, each checked against `target`."""
    names = [MANIFEST_NAME] if (folder / MANIFEST_NAME).is_file() else []
    names += sorted(p.name for p in folder.glob("manifest.part-*.json") if _PART_RE.fullmatch(p.name))
    sources = []
    for name in names:
        try:
            found = read_manifest_file(folder / name)
        except DatasetNotFoundError:  # a part merged and removed by another rank meanwhile
            continue
        diffs = differences(found.layout(), target.layout())
        if diffs:
            raise FingerprintMismatchError(
                f"{folder} already holds a different data set ({name}):\n"
                f"{format_differences(diffs, ('in folder', 'requested'))}\n"
                f"Pick another folder (data.dir) or delete {folder} to generate this one there.",
                diffs)
        sources.append((name, found))
    return sources


def _merged_records(sources: list[tuple[str, Manifest]], world_size: int) -> dict[int, ShardRecord]:
    """Union of the listed shards; for shard i the part of its owner (rank i % W of this world)
    wins, then other parts, then manifest.json."""
    def priority(name: str, index: int) -> int:
        m = _PART_RE.fullmatch(name)
        if m is None:
            return 0
        r, w = int(m.group(1)), int(m.group(2))
        return 2 if (w == world_size and index % w == r) else 1

    best: dict[int, tuple[int, ShardRecord]] = {}
    for name, manifest in sources:
        for rec in manifest.shards:
            p = priority(name, rec.index)
            if rec.index not in best or p >= best[rec.index][0]:
                best[rec.index] = (p, rec)
    return {i: rec for i, (_, rec) in best.items()}


def _with_shards(target: Manifest, records: Mapping[int, ShardRecord], created: str) -> Manifest:
    shards = sorted(records.values(), key=lambda r: r.index)
    return replace(target, shards=shards, created=created, updated=utc_now(),
                   complete=len(shards) == target.num_shards)


def merge_manifest(folder: str | os.PathLike, target: Manifest, rank: int = 0, world_size: int = 1,
                   sole_writer: bool = False) -> Manifest:
    """Merge manifest.json and the part files; if every shard is listed, write the complete
    manifest.json atomically and remove the parts. Idempotent; safe to race with other ranks
    (a merge only ever writes a complete shard list). `sole_writer` (no other rank runs) also
    writes an incomplete merge. Returns the merged view."""
    folder = Path(folder)
    sources = _existing_sources(folder, target)
    records = _merged_records(sources, world_size)
    created = min((m.created for _, m in sources if m.created), default=target.created)
    merged = _with_shards(target, records, created)
    parts = [name for name, _ in sources if name != MANIFEST_NAME]
    already = dict(sources).get(MANIFEST_NAME)
    if (merged.complete or sole_writer) and (parts or already is None or not already.complete):
        write_json_atomic(folder / MANIFEST_NAME, merged.to_dict(), temp_suffix=f".tmp.r{rank}")
        for name in parts:
            (folder / name).unlink(missing_ok=True)
    return merged


def _remove_stray_temps(folder: Path, mine: set[int], rank: int, world_size: int) -> list[str]:
    """Delete temp files of a killed run that this rank may own: temps of its shards, its own
    manifest temps and, on rank 0, manifest temps of ranks outside this world."""
    removed = []
    for path in folder.iterdir():
        name = path.name
        shard = re.fullmatch(r"shard-(\d+)\.(?:" + "|".join(ROLES) + r")\.npy" + re.escape(TEMP_SUFFIX), name)
        temp = _MANIFEST_TEMP_RE.fullmatch(name)
        if ((shard and int(shard.group(1)) in mine)
                or (temp and (int(temp.group(2)) == rank or (rank == 0 and int(temp.group(2)) >= world_size)))):
            path.unlink(missing_ok=True)
            removed.append(name)
    return removed


# ---------------------------------------------------------------- the driver


def _check_args(num_trajectories: int, shard_size: int, seed: int, batch_size: int,
                noise_dtype: torch.dtype) -> None:
    for name, v, lo in (("num_trajectories", num_trajectories, 1), ("shard_size", shard_size, 1),
                        ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if seed >= 2**63:
        raise ValueError(f"seed must be < 2**63, got {seed}")
    if noise_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"noise_dtype must be torch.float32 or torch.float64 (x_T is drawn and "
                         f"stored in float32), got {noise_dtype}")


def _check_disk_space(folder: Path, planned: int, num_shards: int) -> None:
    free = shutil.disk_usage(folder).free
    if planned > free:
        raise InsufficientDiskSpaceError(
            f"not enough disk space in {folder}: the {num_shards} shard(s) still to write need "
            f"{planned:,} bytes ({_human(planned)}), only {free:,} bytes ({_human(free)}) are free. "
            f"Free some space or pick a folder on another disk.")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _solve_batches(solve: Solve, target: Manifest, index: int, batch_size: int,
                   noise_dtype: torch.dtype, on_batch: Callable[[int], None]
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x_T, states) float32 NumPy batches of shard `index`, solving `batch_size` at a time."""
    start = index * target.shard_size
    stop = start + target.expected_count(index)
    shape = target.sample_shape
    for g0 in range(start, stop, batch_size):
        g1 = min(g0 + batch_size, stop)
        x_T = trajectory_noise(target.seed, g0, g1, shape)
        with torch.no_grad():
            states = solve(x_T.to(noise_dtype))
        want = (g1 - g0, target.num_times, *shape)
        if not isinstance(states, torch.Tensor) or tuple(states.shape) != want:
            got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(f"solve(x_T [{g1 - g0}, {', '.join(map(str, shape))}]) must return a tensor "
                             f"of shape [b, M, *sample_shape] = {list(want)}, got {got}")
        states = states.detach().to("cpu", torch.float32)
        bad = (~torch.isfinite(states)).flatten(1).any(1).nonzero().flatten()
        if len(bad):
            raise DatasetError(f"solve returned non-finite values for trajectories "
                               f"{(bad[:10] + g0).tolist()} (shard {index}); nothing of this shard is kept. "
                               f"Check the teacher/solver settings.")
        on_batch(g1 - g0)
        yield x_T.numpy(), states.numpy()


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))


def generate_dataset(out_dir: str | os.PathLike, *, solve: Solve, fingerprint: Mapping[str, Any],
                     num_trajectories: int, shard_size: int, sample_shape: Sequence[int], seed: int,
                     batch_size: int, rank: int | None = None, world_size: int | None = None,
                     repair: bool = False, progress: bool = True,
                     noise_dtype: torch.dtype = torch.float32) -> Manifest:
    """Generate (or resume, or repair) a trajectory data set in `out_dir`.

    solve: x_T [b, *sample_shape] (dtype `noise_dtype`, CPU) -> states [b, M, *sample_shape], the
        teacher's solution at the M = len(fingerprint["times"]) output times (any device/float dtype;
        stored as float32). Called under torch.no_grad with at most `batch_size` trajectories.
    fingerprint: {teacher, solver, grid, times, ...} (see `make_fingerprint`); a folder holding a
        data set with another fingerprint, seed, count or shard size is refused.
    repair: checksum every listed shard of this rank and regenerate the bad or missing ones.
    Memory stays O(batch_size) whatever `num_trajectories`. Returns the manifest: complete once
    every rank is done (with W > 1 and no process group, only the last rank to finish sees it so).
    """
    folder = Path(out_dir)
    rank, world_size = resolve_rank(rank, world_size)
    _check_args(num_trajectories, shard_size, seed, batch_size, noise_dtype)
    fp = normalize_fingerprint(fingerprint, sample_shape)
    target = Manifest.new(fp, seed, num_trajectories, shard_size, NOISE_DESCRIPTION, torch.__version__)
    folder.mkdir(parents=True, exist_ok=True)
    group = _uses_process_group(rank, world_size)
    num_shards = len(shard_counts(num_trajectories, shard_size))
    mine = [i for i in range(num_shards) if i % world_size == rank]

    for name in _remove_stray_temps(folder, set(mine), rank, world_size):
        log.info("removed %s left by an interrupted run", name)
    if world_size == 1:  # sole writer: fold any parts of an earlier multi-rank run into manifest.json
        if any(_PART_RE.fullmatch(p.name) for p in folder.glob("manifest.part-*.json")):
            merge_manifest(folder, target, rank, world_size, sole_writer=True)
    sources = _existing_sources(folder, target)
    records = _merged_records(sources, world_size)
    created = min((m.created for _, m in sources if m.created), default=target.created)
    view = _with_shards(target, records, created)

    listed_mine = [i for i in mine if i in records]
    if repair:
        log.info("repair: checksumming %d listed shard(s) of this rank", len(listed_mine))
        problems = find_bad_shards(folder, view, full=True, indices=listed_mine)
        for i, name, what in problems:
            log.warning("repair: %s (shard %d): %s -> regenerating", name, i, what)
    else:
        problems = find_bad_shards(folder, view, full=False, indices=listed_mine)
        if problems:
            raise CorruptShardError(folder, problems)
    old = {i: records.pop(i) for i in sorted({p[0] for p in problems})}
    todo = [i for i in mine if i not in records]

    if not todo:
        log.info("nothing to do for rank %d/%d: %d/%d shards whole", rank, world_size, len(records), num_shards)
    elif old:
        log.info("repair: regenerating %d shard(s); %d/%d shards whole", len(todo), len(records), num_shards)
    elif records:
        log.info("resuming: %d/%d shards done", len(records), num_shards)
    missing_all = [i for i in range(num_shards) if i not in records]
    planned = sum(npy_file_size(target.expected_shape(i, role)) for i in missing_all for role in ROLES)
    _check_disk_space(folder, planned, len(missing_all))
    if group:
        torch.distributed.barrier()  # nobody writes before every rank has checked and cleaned up

    ledger = folder / (MANIFEST_NAME if world_size == 1 else part_name(rank, world_size))
    show = progress and rank == 0 and bool(todo)
    with _progress(show) as bar:
        if bar is not None:
            t_shards = bar.add_task(f"shards (rank {rank}/{world_size})", total=len(todo))
            t_traj = bar.add_task("trajectories", total=sum(target.expected_count(i) for i in todo))
        on_batch = (lambda n: bar.advance(t_traj, n)) if bar is not None else (lambda n: None)
        for i in todo:
            try:
                rec = write_shard(folder, target, i, _solve_batches(solve, target, i, batch_size,
                                                                    noise_dtype, on_batch))
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise InsufficientDiskSpaceError(
                        f"disk full while writing shard {i} in {folder} ({e}). The {len(records)} whole "
                        f"shards are kept; free space and rerun the same command to resume.") from e
                raise
            if i in old and old[i].files != rec.files:
                log.warning("shard %d was regenerated with other bytes than first recorded (different "
                            "torch version or CPU?); the manifest now lists the new checksums", i)
            records[i] = rec
            listed = records if world_size == 1 else {j: r for j, r in records.items() if j % world_size == rank}
            write_json_atomic(ledger, _with_shards(target, listed, created).to_dict(),
                              temp_suffix=f".tmp.r{rank}")
            if bar is not None:
                bar.advance(t_shards)

    if group:
        torch.distributed.barrier()
        if rank == 0:
            merge_manifest(folder, target, rank, world_size)
        torch.distributed.barrier()
    merged = merge_manifest(folder, target, rank, world_size)
    if merged.complete:
        log.info("data set complete: %d shards, %d trajectories in %s", merged.num_shards,
                 num_trajectories, folder)
    else:
        log.info("rank %d/%d done; %d/%d shards whole; the last rank to finish writes manifest.json",
                 rank, world_size, len(merged.shards), num_shards)
    return merged
