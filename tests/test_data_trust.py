"""Nothing from disk is trusted: flipped bits, NaN shards, NaN teachers, concurrent runs, absurd sizes.

Every refusal is one line naming the file and the fix, and leaves what was on disk as it was.
"""

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from dsno.data import (
    CorruptShardError,
    DatasetTooLargeError,
    FolderLockedError,
    InsufficientDiskSpaceError,
    NonFiniteStatesError,
    TrajectoryDataset,
    load_manifest,
    trajectory_noise,
)
from dsno.data.lock import LOCK_NAME, generation_lock
from dsno.data.manifest import MANIFEST_NAME, REPAIR_HINT
from test_data_generate import generate, solve, start_until

FIX = f"Fix: regenerate only the bad shards, bit for bit: `{REPAIR_HINT}` (or generate_dataset(..., repair=True))."


def flip_bit(path, offset=-5):
    """Flip one bit of a file's data, keeping its size (and, with restore_mtime, its mtime)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even a tool that restores mtime is caught
    return hashlib.sha256(bytes(data)).hexdigest()


def shard_files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*"))}


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.name != "verified.json"}


def sha_message(folder, name, index, digest):
    sha = next(s.files[r].sha256 for s in load_manifest(folder).shards for r in s.files
               if s.files[r].name == name)
    return (f"data set in {folder} has 1 bad shard file(s): {name} (shard {index}): sha256 {digest[:16]} "
            f"differs from the manifest's {sha[:16]} (first 16 hex digits). {FIX}")


# ---------------------------------------------------------------- flipped bits


def test_flipped_bit_is_caught_by_data_gen_by_default(tmp_path):
    folder, reference = tmp_path / "d", tmp_path / "ref"
    generate(folder)
    generate(folder)  # a clean rerun verifies every shard and records it in verified.json
    assert (folder / "verified.json").exists()
    digest = flip_bit(folder / "shard-00001.states.npy")
    before = files_of(folder)
    with pytest.raises(CorruptShardError) as err:
        generate(folder, solve=lambda x: pytest.fail("nothing should be solved"))
    assert str(err.value) == sha_message(folder, "shard-00001.states.npy", 1, digest)
    assert files_of(folder) == before
    calls = []
    generate(folder, repair=True, solve=lambda x: calls.append(len(x)) or solve(x))
    assert calls == [2, 1]  # repair regenerates exactly that shard (3 trajectories in batches of 2)
    generate(reference)
    assert shard_files(folder) == shard_files(reference)


def test_flipped_bit_is_caught_by_the_teacher_stage(tiny_run):
    from dsno.builders import build_teacher, state_shape
    from dsno.stages.trajectories import generate as stage_generate
    rc = tiny_run()
    teacher = build_teacher(rc.teacher)
    shape = state_shape(teacher)
    stage_generate(rc, teacher, shape, progress=False)
    folder = Path(rc.data.dir)
    digest = flip_bit(folder / "shard-00000.x_T.npy", offset=200)
    before = files_of(folder)
    with pytest.raises(CorruptShardError) as err:
        stage_generate(rc, teacher, shape, progress=False)
    assert str(err.value) == sha_message(folder, "shard-00000.x_T.npy", 0, digest)
    assert files_of(folder) == before


@pytest.mark.parametrize("num_workers", [0, 2])
def test_flipped_bit_never_reaches_a_training_batch(tmp_path, num_workers):
    from dsno.training.data import StepTrajectoryData
    generate(tmp_path, num_trajectories=12, shard_size=4)
    digest = flip_bit(tmp_path / "shard-00002.states.npy")
    bad_rows = set(range(8, 12))
    data = StepTrajectoryData(tmp_path, batch_size=2, num_workers=num_workers, val_fraction=0.0, seed=0)
    seen = []
    with pytest.raises(CorruptShardError) as err:
        for x_T, _ in data.train_dataloader():  # default verify: quick; an endless stream of batches
            seen.append(x_T)
            assert len(seen) < 50, "the bad shard was never refused"
    assert str(err.value) == sha_message(tmp_path, "shard-00002.states.npy", 2, digest)
    noise = trajectory_noise(7, 0, 12, (1, 3, 3))
    delivered = {int(j) for x in seen for j in range(12) for row in x if torch.equal(row, noise[j])}
    assert not delivered & bad_rows  # only batches before the bad shard's first use were delivered


def test_verified_files_are_not_read_again_until_they_change(tmp_path, monkeypatch):
    generate(tmp_path, num_trajectories=12, shard_size=4)
    ds = TrajectoryDataset(tmp_path)
    for i in range(12):
        ds[i]
    ds.verifier.flush()
    assert ds.verifier.seconds > 0
    import dsno.data.verify as verify
    real = verify.check_shard_content
    reads = []
    monkeypatch.setattr(verify, "check_shard_content", lambda *a: reads.append(a[2].index) or real(*a))
    again = TrajectoryDataset(tmp_path)
    for i in range(12):
        again[i]
    assert reads == []  # every file version is in verified.json
    digest = flip_bit(tmp_path / "shard-00001.x_T.npy")
    third = TrajectoryDataset(tmp_path)
    third[0]
    with pytest.raises(CorruptShardError) as err:
        third[5]
    assert str(err.value) == sha_message(tmp_path, "shard-00001.x_T.npy", 1, digest)
    assert reads == [1]
    with pytest.raises(CorruptShardError):
        TrajectoryDataset(tmp_path, verify="full")  # ignores the cache: reads every shard up front
    assert sorted(set(reads[1:])) == [0, 1, 2]
    n = len(reads)
    TrajectoryDataset(tmp_path, verify="none")[5]  # trusts the manifest, as documented
    assert len(reads) == n


# ---------------------------------------------------------------- non-finite values


def test_nan_shard_with_a_valid_checksum_is_refused_by_name(tmp_path):
    generate(tmp_path)
    path = tmp_path / "shard-00001.states.npy"
    arr = np.load(path)
    arr[1, 2, 0, 1, 1] = np.nan
    arr[2, 0, 0, 0, 0] = np.inf
    np.save(path, arr)
    d = json.loads((tmp_path / MANIFEST_NAME).read_text())
    d["shards"][1]["files"]["states"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(d))
    message = (f"data set in {tmp_path} has 1 bad shard file(s): shard-00001.states.npy (shard 1): holds "
               f"NaN/inf values (trajectories 4, 5) although its checksum matches. {FIX}")
    ds = TrajectoryDataset(tmp_path)
    ds[0]
    with pytest.raises(CorruptShardError) as err:
        ds[3]
    assert str(err.value) == message
    with pytest.raises(CorruptShardError) as err:
        TrajectoryDataset(tmp_path, verify="full")
    assert str(err.value) == message
    before = files_of(tmp_path)
    with pytest.raises(CorruptShardError) as err:
        generate(tmp_path)
    assert str(err.value) == message and files_of(tmp_path) == before


def test_teacher_stage_refuses_non_finite_states_naming_trajectories(tiny_run):
    from dsno.config import build_schedule
    from dsno.stages.trajectories import generate as stage_generate
    from dsno.teachers import wrap
    rc = tiny_run()
    schedule = build_schedule(rc.teacher.schedule)

    def eps(x, t):  # NaN for trajectories whose first pixel of x_T is large, at the first evaluation
        out = 0.5 * x
        if float(t.flatten()[0]) > 0.99:
            out[x.flatten(1)[:, 0].abs() > 1.8] = float("nan")
        return out

    teacher = wrap(eps, schedule=schedule, name="nan_teacher")
    shape = (1, 16, 16)
    noise = trajectory_noise(rc.seed, 0, rc.data.shard_size, shape)
    bad = [g for g in range(rc.data.shard_size) if abs(float(noise[g].flatten()[0])) > 1.8]
    assert bad
    with pytest.raises(NonFiniteStatesError) as err:
        stage_generate(rc, teacher, shape, progress=False)
    folder = Path(rc.data.dir)
    assert str(err.value) == (
        f"trajectories {', '.join(map(str, bad))} have non-finite states (NaN/inf) at time indices "
        f"0, 1, 2, 3; shard 0 was not written to {folder} and manifest.json lists only whole shards. Fix: "
        f"check the teacher and solver settings (solver.steps, solver.name, data.precision=fp32), then "
        f"rerun to resume")
    assert list(folder.iterdir()) == []  # nothing half-written, no lock left behind


# ---------------------------------------------------------------- concurrency


def test_second_run_is_refused_and_leaves_the_first_ones_files(tmp_path, caplog):
    folder = tmp_path / "d"
    temp = folder / "shard-00001.states.npy.tmp"
    proc = start_until(f"from test_data_generate import run_generation; run_generation({str(folder)!r}, 12, 4, 2, "
                       f"0.25)", temp)
    with pytest.raises(FolderLockedError) as err:
        generate(folder, num_trajectories=12, shard_size=4)
    assert str(err.value) == (
        f"{folder} is being written by another data_gen run (pid {proc.pid} on {socket.gethostname()}; "
        f"lock {LOCK_NAME}); fix: wait for it to finish or stop it, then rerun; one generation writes a "
        f"folder at a time")
    assert temp.exists()  # the refused run touched nothing of the first one's
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == proc.pid  # a stale lock is left behind
    with caplog.at_level(logging.WARNING, logger="dsno.data.lock"):
        assert generate(folder, num_trajectories=12, shard_size=4).complete
    assert f"of pid {proc.pid} on {socket.gethostname()} (no longer running)" in caplog.text
    assert not (folder / LOCK_NAME).exists() and not temp.exists()
    reference = tmp_path / "ref"
    generate(reference, num_trajectories=12, shard_size=4)
    assert shard_files(folder) == shard_files(reference)


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="dsno.data.lock"):
        assert generate(tmp_path).complete
    assert f"took over the stale lock {tmp_path / LOCK_NAME} of pid {dead.pid}" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_refuses_in_process_and_ranks_share_the_folder(tmp_path):
    with generation_lock(tmp_path):
        with pytest.raises(FolderLockedError, match=rf"\(pid {os.getpid()} on "):
            generate(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with generation_lock(tmp_path, rank=0, world_size=2):
        with generation_lock(tmp_path, rank=1, world_size=2):  # ranks of one run share the folder
            with pytest.raises(FolderLockedError, match=rf"another data_gen run \(pid {os.getpid()} on "):
                generate(tmp_path)  # a single-rank run is refused
            with pytest.raises(FolderLockedError, match=r"lock data_gen.lock.rank-00001-of-00002"):
                generate(tmp_path, rank=1, world_size=2)  # and so is a second copy of rank 1
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- sizes


def test_absurd_count_is_refused_fast_by_the_disk_check(tmp_path):
    folder = tmp_path / "huge"
    start = time.perf_counter()
    with pytest.raises(InsufficientDiskSpaceError) as err:
        generate(folder, num_trajectories=10**12, shard_size=1024)
    assert time.perf_counter() - start < 5
    bytes_needed = 976_562_500 * (2 * 128 + 1024 * 36 + 1024 * 108)  # 10**12 = 976,562,500 x 1024
    assert str(err.value).startswith(
        f"not enough disk space in {folder}: the 976,562,500 shard(s) still to write need {bytes_needed:,} bytes")
    assert str(err.value).endswith(
        "Fix: free some space, lower data.num_trajectories, or pick a folder on another disk (data.dir).")
    assert not folder.exists()  # nothing was created


def test_too_many_shards_are_refused_before_any_work(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(2**60, 0, 2**60))
    start = time.perf_counter()
    with pytest.raises(DatasetTooLargeError) as err:
        generate(tmp_path / "many", num_trajectories=10**9, shard_size=3)
    assert time.perf_counter() - start < 5
    assert str(err.value) == ("data.num_trajectories=1,000,000,000 in shards of data.shard_size=3 makes "
                              "333,333,334 shards, more than the 10,000 one manifest lists; fix: raise "
                              "data.shard_size to at least 100,000")
    assert not (tmp_path / "many").exists()


# ---------------------------------------------------------------- training


def test_non_finite_loss_message_claims_a_checkpoint_only_if_there_is_one(tmp_path):
    from dsno.training.module import non_finite_loss_message
    last = tmp_path / "checkpoints" / "last.ckpt"
    fix = "Fix: lower train.lr or enable train.grad_clip (trajectories are checked for NaN/inf unless data.verify=none)"
    assert non_finite_loss_message(float("nan"), 0, last) == (
        f"training loss is nan at step 0; stopping: no checkpoint was written yet ({last} does not exist). {fix}")
    assert non_finite_loss_message(float("inf"), 3, None) == (
        f"training loss is inf at step 3; stopping: no checkpoint was written yet. {fix}")
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert non_finite_loss_message(float("nan"), 7, last) == (
        f"training loss is nan at step 7; stopping: the last good checkpoint {last} is kept "
        f"(train.resume=true resumes from it). {fix}")


def test_nan_loss_at_the_first_step_says_no_checkpoint_exists(tiny_run, tmp_path):
    from dsno.stages.pipeline import run
    from dsno.training.module import DSNOModule, NonFiniteLossError
    rc = tiny_run(run_dir=tmp_path / "nan0")
    orig = DSNOModule.training_step

    def poisoned(self, batch, batch_idx):
        return orig(self, (batch[0] * float("nan"), batch[1]), batch_idx)

    DSNOModule.training_step = poisoned
    try:
        with pytest.raises(NonFiniteLossError, match=r"at step 0; stopping: no checkpoint was written yet \("):
            run(rc, through="train")
    finally:
        DSNOModule.training_step = orig
    assert not (tmp_path / "nan0" / "checkpoints" / "last.ckpt").exists()
