"""The generation driver: values, resume after SIGKILL, repair, refusals, bounded memory."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from dsno.data import (
    CorruptShardError,
    DatasetError,
    FingerprintMismatchError,
    InsufficientDiskSpaceError,
    NonFiniteStatesError,
    generate_dataset,
    load_manifest,
    make_fingerprint,
    resolve_rank,
    trajectory_noise,
    verify_dataset,
)
from dsno.data.generate import noise_seed
from dsno.data.manifest import MANIFEST_NAME

TIMES = [0.75, 0.5, 0.0]
SHAPE = (1, 3, 3)
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def solve(x_T):
    """A cheap deterministic stand-in for an ODE solver: state at t_m = x_T (1 + t_m) + t_m."""
    t = torch.tensor(TIMES, dtype=x_T.dtype).view(1, -1, *([1] * (x_T.ndim - 1)))
    return x_T[:, None] * (1 + t) + t


def fingerprint(**changes):
    fp = dict(teacher={"class": "Toy", "scale": 1.0}, solver={"name": "toy", "order": 1, "options": {}},
              grid=[1.0, 0.75, 0.5, 0.25, 0.0], times=TIMES)
    fp.update(changes)
    return make_fingerprint(**fp, state_shape=SHAPE)


def generate(folder, **kw):
    args = dict(solve=solve, fingerprint=fingerprint(), num_trajectories=10, shard_size=3,
                state_shape=SHAPE, seed=7, batch_size=2, progress=False)
    args.update(kw)
    return generate_dataset(folder, **args)


def snapshot(folder):
    """The manifest's shard list and the bytes of every shard file."""
    folder = Path(folder)
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}
    return load_manifest(folder).to_dict()["shards"], files


def run_generation(out_dir, num_trajectories, shard_size, batch_size, sleep_per_batch):
    """Entry point for generation in a subprocess (slow solve, so it can be killed mid-shard)."""
    def slow_solve(x_T):
        time.sleep(sleep_per_batch)
        return solve(x_T)

    generate(out_dir, solve=slow_solve, num_trajectories=num_trajectories, shard_size=shard_size,
             batch_size=batch_size)


def python_c(code):
    return [sys.executable, "-c", f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]; {code}"]


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: threads only add contention


def start_until(code, target):
    """A generation subprocess running `code` (see `python_c`), once it has created file `target`."""
    proc = subprocess.Popen(python_c(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SUBPROCESS_ENV)
    deadline = time.monotonic() + 60
    while not target.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"generation never made {target.name}"
        time.sleep(0.005)
    return proc


def test_values_are_noise_and_its_solution(tmp_path):
    m = generate(tmp_path)
    assert m.complete and [s.count for s in m.shards] == [3, 3, 3, 1]
    assert m.times == TIMES and m.state_shape == SHAPE and m.seed == 7
    x_T = np.concatenate([np.load(tmp_path / f"shard-{i:05d}.x_T.npy") for i in range(4)])
    states = np.concatenate([np.load(tmp_path / f"shard-{i:05d}.states.npy") for i in range(4)])
    noise = trajectory_noise(7, 0, 10, SHAPE)
    assert torch.equal(torch.from_numpy(x_T), noise)
    assert torch.equal(torch.from_numpy(states), solve(noise))
    assert abs(noise.mean()) < 0.5 and 0.6 < noise.std() < 1.4  # standard normal draws
    assert not torch.equal(trajectory_noise(8, 0, 10, SHAPE), noise)  # the seed matters
    # noise of a trajectory does not depend on batching or sharding
    assert torch.equal(trajectory_noise(7, 4, 6, SHAPE), noise[4:6])
    generate(tmp_path / "other", shard_size=4, batch_size=3)
    x_other = np.concatenate([np.load(tmp_path / "other" / f"shard-{i:05d}.x_T.npy") for i in range(3)])
    assert np.array_equal(x_other, x_T)


def test_noise_seeds_are_the_ones_every_data_set_was_made_with():
    # values of the hand-written BLAKE2b seed before it moved to dsno.seeding: fingerprints and resume hold
    assert [noise_seed(s, i) for s in (0, 7, 2**63 - 1) for i in (0, 1, 12345)] == [
        3750911886836698674, 16807491087351725307, 9746722059088943131, 1461523427588417409,
        4901085577757109828, 7899590534170044112, 3325559682322043172, 3962829866412714849,
        16571546931992647327]
    assert float(trajectory_noise(7, 0, 5, (1, 4, 4)).double().sum()) == -1.456631924957037


def test_float64_solve_sees_the_stored_noise(tmp_path):
    seen = []

    def record(x_T):
        seen.append(x_T)
        return solve(x_T)

    generate(tmp_path, solve=record, noise_dtype=torch.float64, num_trajectories=4, shard_size=4, batch_size=4)
    assert seen[0].dtype == torch.float64
    assert torch.equal(seen[0].float(), trajectory_noise(7, 0, 4, SHAPE))
    with pytest.raises(ValueError, match="noise_dtype must be torch.float32 or torch.float64"):
        generate(tmp_path / "x", noise_dtype=torch.float16)


def test_sigkill_mid_shard_then_resume_is_bitwise_identical(tmp_path, caplog):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    target = killed / "shard-00001.states.npy.tmp"  # shard 1 is being written
    proc = start_until(f"from test_data_generate import run_generation; run_generation({str(killed)!r}, 12, 4, 2, "
                       f"0.25)", target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert target.exists()  # killed mid-write: the temp file is left behind...
    partial = load_manifest(killed)
    assert [s.index for s in partial.shards] == [0] and not partial.complete  # ...and not listed
    with pytest.raises(DatasetError, match="unfinished"):
        verify_dataset(killed)  # (an unfinished data set does not verify)

    with caplog.at_level(logging.INFO, logger="dsno.data.generate"):
        resumed = generate(killed, num_trajectories=12, shard_size=4)
    assert "resuming: 1/3 shards done" in caplog.text
    assert "removed shard-00001.states.npy.tmp" in caplog.text
    generate(reference, num_trajectories=12, shard_size=4)
    assert resumed.complete
    assert snapshot(killed) == snapshot(reference)
    assert sorted(p.name for p in killed.iterdir() if ".tmp" in p.name) == []
    verify_dataset(killed, full=True)


def test_a_data_set_begun_by_format_version_1_resumes_bitwise_identical(tmp_path):
    old, reference = tmp_path / "old", tmp_path / "reference"
    generate(reference, num_trajectories=12, shard_size=4)
    generate(old, num_trajectories=12, shard_size=4)
    d = json.loads((old / MANIFEST_NAME).read_text())     # as dsno before format_version 2 left it after shard 0
    d.update(format_version=1, complete=False, shards=d["shards"][:1],
             fingerprint={("sample_shape" if k == "state_shape" else k): v for k, v in d["fingerprint"].items()})
    (old / MANIFEST_NAME).write_text(json.dumps(d))
    for p in old.glob("shard-0000[12].*"):
        p.unlink()
    resumed = generate(old, num_trajectories=12, shard_size=4)
    assert resumed.complete and resumed.format_version == 2
    assert snapshot(old) == snapshot(reference)
    assert json.loads((old / MANIFEST_NAME).read_text())["fingerprint"]["state_shape"] == list(SHAPE)


def test_rerun_of_a_complete_dataset_writes_nothing(tmp_path, caplog, monkeypatch):
    generate(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with caplog.at_level(logging.INFO, logger="dsno.data.generate"):
        generate(tmp_path, solve=lambda x: pytest.fail("nothing should be solved"))
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert after.pop("verified.json") and after == before  # only the record of the checksums read
    assert "nothing to do for rank 0/1: 4/4 shards whole" in caplog.text
    # a third run finds every file recorded as verified: it reads no shard and writes nothing
    monkeypatch.setattr("dsno.data.verify.check_shard_content", lambda *a: pytest.fail("read a shard"))
    generate(tmp_path, solve=lambda x: pytest.fail("nothing should be solved"))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == {**before, "verified.json":
                                                                           (tmp_path / "verified.json").stat().st_mtime_ns}


def test_repair_regenerates_only_the_bad_shard(tmp_path):
    generate(tmp_path)
    original = snapshot(tmp_path)
    victim = tmp_path / "shard-00002.x_T.npy"
    data = bytearray(victim.read_bytes())
    data[200] ^= 0x40
    victim.write_bytes(bytes(data))
    (tmp_path / "shard-00003.states.npy").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}
    time.sleep(0.01)
    with pytest.raises(CorruptShardError) as err:
        verify_dataset(tmp_path)
    assert [(i, name) for i, name, _ in err.value.problems] == [(2, "shard-00002.x_T.npy"),
                                                                 (3, "shard-00003.states.npy")]
    with pytest.raises(CorruptShardError, match="shard-00003.states.npy"):
        generate(tmp_path)  # a plain rerun sees the missing file and points to repair

    calls = []
    generate(tmp_path, repair=True, solve=lambda x: calls.append(len(x)) or solve(x))
    assert calls == [2, 1, 1]  # shard 2 (batches of 2 + 1) and shard 3 (one trajectory) only
    assert snapshot(tmp_path) == original
    changed = {p.name for p in tmp_path.glob("shard-*") if p.stat().st_mtime_ns != mtimes.get(p.name)}
    assert changed == {"shard-00002.x_T.npy", "shard-00002.states.npy", "shard-00003.states.npy",
                       "shard-00003.x_T.npy"}
    verify_dataset(tmp_path, full=True)


def test_other_fingerprint_is_refused_showing_both_sides(tmp_path):
    generate(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(FingerprintMismatchError) as err:
        generate(tmp_path, fingerprint=fingerprint(teacher={"class": "Other", "scale": 1.0}), seed=8)
    text = str(err.value)
    assert "fingerprint.teacher.class: in folder 'Toy' vs requested 'Other'" in text
    assert "seed: in folder 7 vs requested 8" in text
    assert "Fix: pick another folder" in text and str(tmp_path) in text and "\n" not in text
    with pytest.raises(FingerprintMismatchError, match=r"fingerprint.times\[1\]: in folder 0.5 vs requested 0.4"):
        generate(tmp_path, fingerprint=fingerprint(times=[0.75, 0.4, 0.0]))
    with pytest.raises(FingerprintMismatchError, match="num_trajectories: in folder 10 vs requested 11"):
        generate(tmp_path, num_trajectories=11)
    assert snapshot(tmp_path) == before


def test_disk_space_is_checked_first(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientDiskSpaceError) as err:
        generate(tmp_path)
    # .npy files of 4 shards (128-byte headers): 3 x (128 + 108 + 128 + 324) + (128 + 36 + 128 + 108)
    assert "need 2,464 bytes (2.4 KiB)" in str(err.value) and "only 1,000 bytes" in str(err.value)
    assert str(tmp_path) in str(err.value) and "4 shard(s)" in str(err.value)
    assert list(tmp_path.glob("shard-*")) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 0, 2464))
    assert generate(tmp_path).complete
    assert sum(p.stat().st_size for p in tmp_path.glob("shard-*")) == 2464


def test_bad_solver_output_keeps_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"must return a tensor of shape \[b, M, \*state_shape\] = \[2, 3, 1, 3, 3\]"):
        generate(tmp_path, solve=lambda x: x)

    def nan_on_shard_1(x):
        out = solve(x)
        if len(calls) == 2:
            out[1, 0, 0, 0, 0] = float("nan")
        calls.append(1)
        return out

    calls = []
    with pytest.raises(NonFiniteStatesError) as err:
        generate(tmp_path, solve=nan_on_shard_1)
    assert str(err.value) == (
        f"trajectories 4 have non-finite states (NaN/inf) at time index 0 (t = 0.75); shard 1 was not "
        f"written to {tmp_path} and manifest.json lists only whole shards. Fix: check the teacher and "
        f"solver settings (solver.steps, solver.name, data.precision=fp32), then rerun to resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "shard-00000.states.npy",
                                                          "shard-00000.x_T.npy"]
    assert [s.index for s in load_manifest(tmp_path).shards] == [0]


def test_argument_errors(tmp_path, monkeypatch):
    for kw, message in ((dict(num_trajectories=0), "num_trajectories must be an integer >= 1, got 0"),
                        (dict(batch_size=1.5), "batch_size must be an integer >= 1, got 1.5"),
                        (dict(seed=-1), "seed must be an integer >= 0"),
                        (dict(state_shape=(1, 3)), r"state_shape \[1, 3\]"),
                        (dict(rank=2, world_size=2), "need 0 <= rank < world_size")):
        with pytest.raises(ValueError, match=message):
            generate(tmp_path, **kw)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank(None, None) == (1, 3)
    assert resolve_rank(0, 1) == (0, 1)
    with pytest.raises(ValueError, match="give both rank and world_size"):
        resolve_rank(0, None)


def test_memory_stays_flat_with_10x_more_trajectories(tmp_path):
    """Peak RSS of a 10x larger run (46 MB more data) stays within a few MB of the small run."""
    code = ("import resource, torch; from dsno.data import generate_dataset, make_fingerprint; "
            "fp = make_fingerprint(teacher={{}}, solver={{}}, grid=[1.0, 0.0], times=[0.75, 0.5, 0.25, 0.0], "
            "state_shape=(3, 16, 16)); "
            "generate_dataset({out!r}, solve=lambda x: x[:, None].expand(-1, 4, -1, -1, -1) * 0.5, "
            "fingerprint=fp, num_trajectories={n}, shard_size=100, state_shape=(3, 16, 16), seed=0, "
            "batch_size=50, progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    procs = {n: subprocess.Popen(python_c(code.format(out=str(tmp_path / str(n)), n=n)), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SUBPROCESS_ENV)
             for n in (300, 3000)}
    peaks = {}
    for n, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        peaks[n] = int(stdout.split()[-1]) / 1024  # MiB
    data_mib = sum(p.stat().st_size for p in (tmp_path / "3000").glob("shard-*")) / 2**20
    assert data_mib > 40
    assert peaks[3000] - peaks[300] < 10, (peaks, data_mib)
