"""The generation driver: teacher trajectories into a resumable, rank-sharded data set.

Trajectory g (0 <= g < num_trajectories) lives in shard g // shard_size. Its noise, and in a
conditional data set its class label, depend on (seed, g) only (`trajectory_noise`,
`trajectory_labels`), so an interrupted-and-resumed run, a repaired shard and a
run over any number of ranks all write the same bytes (on the same CPU and software).

Rank r of W writes the shards i with i % W == r. With W == 1 the driver updates `manifest.json`
after each shard; with W > 1 each rank updates its part `manifest.part-<r>-of-<W>.json`, and the
parts are merged into `manifest.json` once every shard is whole (by rank 0 after a barrier when
torch.distributed is initialised, else by whichever rank finds all parts done).

Before any work: the disk-space check (closed form, any count) and the shard-count bound, then
the folder lock (`dsno.data.lock`: one run per folder), then the bytes of the shards already
listed are verified (`dsno.data.verify`) before the run resumes from them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from dsno.atomic import is_disk_full, refuse_link
from dsno.data.lock import generation_lock
from dsno.data.manifest import (
    ALL_ROLES,
    LABELS,
    MANIFEST_NAME,
    CorruptShardError,
    DatasetNotFoundError,
    DatasetTooLargeError,
    FingerprintMismatchError,
    InsufficientDiskSpaceError,
    Manifest,
    NonFiniteStatesError,
    ShardRecord,
    differences,
    format_differences,
    normalize_fingerprint,
    read_manifest_file,
    utc_now,
    write_json_atomic,
)
from dsno.data.shards import (TEMP_SUFFIX, find_bad_shards, npy_file_size, remove_stray_temp, role_dtype,
                              write_shard)
from dsno.data.verify import CACHE_NAME, ShardVerifier
from dsno.progress import progress_bar
from dsno.seeding import LABEL, NOISE, index_seed

log = logging.getLogger(__name__)

NOISE_DESCRIPTION = ("x_T of trajectory g = torch.randn(state_shape, dtype=float32, generator="
                     "torch.Generator().manual_seed(blake2b-64(seed, g)))")
_PART_RE = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json")
_MANIFEST_TEMP_RE = re.compile(r"manifest(\.part-\d+-of-\d+)?\.json\.tmp\.r(\d+)")

Solve = Callable[[torch.Tensor], torch.Tensor]
VERIFY_CHOICES = ("none", "quick", "full")
MAX_SHARDS = 10_000  # the manifest is rewritten after each shard: its size must stay small


# ---------------------------------------------------------------- noise


def noise_seed(seed: int, index: int) -> int:
    """64-bit generator seed of trajectory `index` under data set `seed` (`dsno.seeding.index_seed`)."""
    return index_seed(seed, index, NOISE)


def trajectory_noise(seed: int, start: int, stop: int, state_shape: Sequence[int]) -> torch.Tensor:
    """x_T of trajectories [start, stop): float32 [stop - start, *state_shape], on the CPU.

    Each trajectory has its own generator, so the values do not depend on batching or sharding.
    """
    out = torch.empty((stop - start, *state_shape), dtype=torch.float32)
    gen = torch.Generator()
    for j, g in enumerate(range(start, stop)):
        gen.manual_seed(noise_seed(seed, g))
        torch.randn(tuple(state_shape), generator=gen, out=out[j])
    return out


def trajectory_labels(seed: int, start: int, stop: int, class_weights: Sequence[float]) -> np.ndarray:
    """Class labels of trajectories [start, stop): int64 [stop - start], label c with probability
    class_weights[c] / sum(class_weights), by inverse CDF of u_g = (index_seed(seed, g, LABEL) >> 11) / 2**53
    (`LABEL_RULE`), so each label depends on (seed, g) and the weights only."""
    cdf = np.cumsum(np.asarray(class_weights, dtype=np.float64))
    u = np.array([(index_seed(seed, g, LABEL) >> 11) * 2.0**-53 for g in range(start, stop)], dtype=np.float64)
    return np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1).astype(np.int64)


LABEL_RULE = ("label of trajectory g = the first c with u_g * sum(w) < w_0 + ... + w_c, u_g = "
              "(blake2b-64(seed, g; person=dsno.label) >> 11) / 2**53, w = class_weights")


def label_rule(class_weights: Sequence[float]) -> dict[str, Any]:
    """The `labels` entry of a conditional data set's fingerprint: the rule (`trajectory_labels`) and
    the class weights, normalised to sum 1. ValueError unless they are finite, >= 0, not all 0."""
    w = np.asarray(class_weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"class weights must be finite numbers >= 0, one per class, not all 0, got "
                         f"{list(class_weights)}")
    return {"rule": LABEL_RULE, "num_classes": len(w), "class_weights": (w / w.sum()).tolist()}


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
                f"{folder} already holds a different data set ({name}): "
                f"{format_differences(diffs, ('in folder', 'requested'))}. "
                f"Fix: pick another folder (data.dir) or delete {folder} to generate this one there.",
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


def _remove_stray_temps(folder: Path, world_size: int, rank: int) -> list[str]:
    """Delete temp files of a killed run: shard temps of this rank's shards that no live writer
    holds, this rank's manifest temps and, in a single-rank run (which holds the folder alone),
    every manifest and cache temp."""
    removed = []
    shard_re = re.compile(r"shard-(\d+)\.(?:" + "|".join(ALL_ROLES) + r")\.npy" + re.escape(TEMP_SUFFIX))
    for path in folder.iterdir():
        name = path.name
        shard = shard_re.fullmatch(name)
        temp = _MANIFEST_TEMP_RE.fullmatch(name)
        if shard:
            if int(shard.group(1)) % world_size == rank and remove_stray_temp(path):
                removed.append(name)
        elif not path.is_symlink() and ((temp and (world_size == 1 or int(temp.group(2)) == rank)) or (
                world_size == 1 and name.startswith(CACHE_NAME + ".tmp."))):  # a link: refused when written
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


def _planned_bytes(target: Manifest, listed: Iterable[int]) -> tuple[int, int]:
    """(bytes, shards) still to write: the whole data set less the listed shards, in closed form."""
    def shard_bytes(i: int) -> int:
        return sum(npy_file_size(target.expected_shape(i, role), role_dtype(role)) for role in target.roles)

    full, rest = divmod(target.num_trajectories, target.shard_size)
    total = full * shard_bytes(0) + (shard_bytes(target.num_shards - 1) if rest else 0)
    listed = list(listed)
    done = sum(shard_bytes(i) for i in listed)
    return total - done, target.num_shards - len(listed)


def _check_disk_space(folder: Path, planned: int, num_shards: int) -> None:
    where = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if planned > free:
        raise InsufficientDiskSpaceError(
            f"not enough disk space in {folder}: the {num_shards:,} shard(s) still to write need "
            f"{planned:,} bytes ({_human(planned)}), only {free:,} bytes ({_human(free)}) are free. "
            f"Fix: free some space, lower data.num_trajectories, or pick a folder on another disk (data.dir).")


def _check_shard_count(target: Manifest) -> None:
    if target.num_shards > MAX_SHARDS:
        need = -(-target.num_trajectories // MAX_SHARDS)
        raise DatasetTooLargeError(
            f"data.num_trajectories={target.num_trajectories:,} in shards of data.shard_size="
            f"{target.shard_size:,} makes {target.num_shards:,} shards, more than the {MAX_SHARDS:,} one "
            f"manifest lists; fix: raise data.shard_size to at least {need:,}")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _non_finite_message(bad: torch.Tensor, g0: int, index: int, target: Manifest, folder: Path) -> str:
    rows = bad.any(1).nonzero().flatten()
    times = bad.any(0).nonzero().flatten().tolist()
    shown = ", ".join(str(int(r) + g0) for r in rows[:10]) + (f" ({len(rows)} in all)" if len(rows) > 10 else "")
    at = (f"time index {times[0]} (t = {target.times[times[0]]:g})" if len(times) == 1 else
          f"time indices {', '.join(map(str, times))}")
    return (f"trajectories {shown} have non-finite states (NaN/inf) at {at}; shard {index} was not "
            f"written to {folder} and manifest.json lists only whole shards. Fix: check the teacher and "
            f"solver settings (solver.steps, solver.name, data.precision=fp32), then rerun to resume")


def _solve_batches(solve: Solve, target: Manifest, index: int, batch_size: int, noise_dtype: torch.dtype,
                   on_batch: Callable[[int], None], folder: Path) -> Iterator[tuple[np.ndarray, ...]]:
    """(x_T, states) float32 NumPy batches of shard `index`, solving `batch_size` at a time; in a
    conditional data set (x_T, states, labels int64), solved as solve(x_T, labels)."""
    rule = target.fingerprint.get(LABELS)
    start = index * target.shard_size
    stop = start + target.expected_count(index)
    shape = target.state_shape
    for g0 in range(start, stop, batch_size):
        g1 = min(g0 + batch_size, stop)
        x_T = trajectory_noise(target.seed, g0, g1, shape)
        labels = None if rule is None else trajectory_labels(target.seed, g0, g1, rule["class_weights"])
        with torch.no_grad():
            states = (solve(x_T.to(noise_dtype)) if labels is None
                      else solve(x_T.to(noise_dtype), torch.from_numpy(labels)))
        want = (g1 - g0, target.num_times, *shape)
        if not isinstance(states, torch.Tensor) or tuple(states.shape) != want:
            got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(f"solve(x_T [{g1 - g0}, {', '.join(map(str, shape))}]) must return a tensor "
                             f"of shape [b, M, *state_shape] = {list(want)}, got {got}")
        states = states.detach().to("cpu", torch.float32)
        bad = ~torch.isfinite(states).flatten(2).all(2)  # [b, M]: trajectory b is non-finite at time m
        if bad.any():
            raise NonFiniteStatesError(_non_finite_message(bad, g0, index, target, folder))
        on_batch(g1 - g0)
        yield (x_T.numpy(), states.numpy()) if labels is None else (x_T.numpy(), states.numpy(), labels)


def generate_dataset(out_dir: str | os.PathLike, *, solve: Solve, fingerprint: Mapping[str, Any],
                     num_trajectories: int, shard_size: int, state_shape: Sequence[int], seed: int,
                     batch_size: int, rank: int | None = None, world_size: int | None = None,
                     repair: bool = False, progress: bool = True,
                     noise_dtype: torch.dtype = torch.float32, verify: str = "quick") -> Manifest:
    """Generate (or resume, or repair) a trajectory data set in `out_dir`.

    solve: x_T [b, *state_shape] (dtype `noise_dtype`, CPU) -> states [b, M, *state_shape], the
        teacher's solution at the M = len(fingerprint["times"]) output times (any device/float dtype;
        stored as float32). When the fingerprint has `labels` ({class_weights: [w_0, ...], ...}),
        solve(x_T, labels) gets each trajectory's class label (int64 [b], `trajectory_labels`),
        stored beside the states. Called under torch.no_grad with at most `batch_size` trajectories.
        A NaN/inf state stops the run (`NonFiniteStatesError`) before its shard is written.
    fingerprint: {teacher, solver, grid, times, ...} (see `make_fingerprint`); a folder holding a
        data set with another fingerprint, seed, count or shard size is refused.
    verify: how the shards already listed for this rank are checked before resuming: "quick"
        reads each one's bytes (sha256, finite values) unless `verified.json` records that exact
        file version as verified; "full" reads them all; "none" checks sizes and headers only.
    repair: read every listed shard of this rank and regenerate the bad or missing ones.
    The disk-space check comes first and is closed-form; memory stays O(batch_size) whatever
    `num_trajectories`. One run per folder (`generation_lock`). Returns the manifest: complete once
    every rank is done (with W > 1 and no process group, only the last rank to finish sees it so).
    """
    folder = Path(out_dir)
    rank, world_size = resolve_rank(rank, world_size)
    _check_args(num_trajectories, shard_size, seed, batch_size, noise_dtype)
    if verify not in VERIFY_CHOICES:
        raise ValueError(f"verify must be one of {VERIFY_CHOICES}, got {verify!r}")
    fp = normalize_fingerprint(fingerprint, state_shape)
    target = Manifest.new(fp, seed, num_trajectories, shard_size, NOISE_DESCRIPTION, torch.__version__)
    if not folder.is_dir():  # nothing to resume: refuse before creating anything
        _check_disk_space(folder, *_planned_bytes(target, ()))
        _check_shard_count(target)
    folder.mkdir(parents=True, exist_ok=True)
    with generation_lock(folder, rank, world_size):
        return _generate_locked(folder, target, solve, batch_size, rank, world_size, repair, progress,
                                noise_dtype, verify)


def _generate_locked(folder: Path, target: Manifest, solve: Solve, batch_size: int, rank: int,
                     world_size: int, repair: bool, progress: bool, noise_dtype: torch.dtype,
                     verify: str) -> Manifest:
    group = _uses_process_group(rank, world_size)
    refuse_link(folder / MANIFEST_NAME)  # written below: a planted link is refused before it is even read
    if world_size == 1:  # sole writer: fold any parts of an earlier multi-rank run into manifest.json
        if any(_PART_RE.fullmatch(p.name) for p in folder.glob("manifest.part-*.json")):
            merge_manifest(folder, target, rank, world_size, sole_writer=True)
    sources = _existing_sources(folder, target)
    records = _merged_records(sources, world_size)
    _check_disk_space(folder, *_planned_bytes(target, records))
    _check_shard_count(target)
    num_shards = target.num_shards
    created = min((m.created for _, m in sources if m.created), default=target.created)
    view = _with_shards(target, records, created)
    for name in _remove_stray_temps(folder, world_size, rank):
        log.info("removed %s left by an interrupted run", name)

    listed_mine = [i for i in sorted(records) if i % world_size == rank]
    if repair or verify != "none":
        verifier = ShardVerifier(folder, view, use_cache=not repair and verify == "quick")
        problems = find_bad_shards(folder, view, full=False, indices=listed_mine)
        bad = {p[0] for p in problems}
        problems += verifier.check(i for i in listed_mine if i not in bad)
        log.info("checked the bytes of %d listed shard(s) of this rank in %.1f s", len(listed_mine),
                 verifier.seconds)
    else:
        problems = find_bad_shards(folder, view, full=False, indices=listed_mine)
    if repair:
        for i, name, what in problems:
            log.warning("repair: %s (shard %d): %s -> regenerating", name, i, what)
    elif problems:
        raise CorruptShardError(folder, sorted(problems))
    old = {i: records.pop(i) for i in sorted({p[0] for p in problems})}
    todo = [i for i in range(rank, num_shards, world_size) if i not in records]

    if not todo:
        log.info("nothing to do for rank %d/%d: %d/%d shards whole", rank, world_size, len(records), num_shards)
    elif old:
        log.info("repair: regenerating %d shard(s); %d/%d shards whole", len(todo), len(records), num_shards)
    elif records:
        log.info("resuming: %d/%d shards done", len(records), num_shards)
    if group:
        torch.distributed.barrier()  # nobody writes before every rank has checked and cleaned up

    ledger = folder / (MANIFEST_NAME if world_size == 1 else part_name(rank, world_size))
    with progress_bar(progress and rank == 0 and bool(todo)) as bar:
        t_shards = bar.add_task(f"shards (rank {rank}/{world_size})", total=len(todo))
        t_traj = bar.add_task("trajectories", total=sum(target.expected_count(i) for i in todo))

        def on_batch(n: int) -> None:
            bar.advance(t_traj, n)
        for i in todo:
            try:
                rec = write_shard(folder, target, i, _solve_batches(solve, target, i, batch_size,
                                                                    noise_dtype, on_batch, folder))
            except OSError as e:
                if is_disk_full(e):
                    raise InsufficientDiskSpaceError(
                        f"disk full while writing shard {i} in {folder} ({e}). The {len(records)} whole "
                        f"shards are kept; fix: free space and rerun the same command to resume.") from e
                raise
            if i in old and old[i].files != rec.files:
                log.warning("shard %d was regenerated with other bytes than first recorded (different "
                            "torch version or CPU?); the manifest now lists the new checksums", i)
            records[i] = rec
            listed = records if world_size == 1 else {j: r for j, r in records.items() if j % world_size == rank}
            write_json_atomic(ledger, _with_shards(target, listed, created).to_dict(),
                              temp_suffix=f".tmp.r{rank}")
            bar.advance(t_shards)

    if group:
        torch.distributed.barrier()
        if rank == 0:
            merge_manifest(folder, target, rank, world_size)
        torch.distributed.barrier()
    merged = merge_manifest(folder, target, rank, world_size)
    if merged.complete:
        log.info("data set complete: %d shards, %d trajectories in %s", merged.num_shards,
                 target.num_trajectories, folder)
    else:
        log.info("rank %d/%d done; %d/%d shards whole; the last rank to finish writes manifest.json",
                 rank, world_size, len(merged.shards), num_shards)
    return merged
