"""Class labels in the teacher stage: each trajectory's label drawn from (seed, g) and the class
weights, stored and checksummed beside its states, part of the data set's fingerprint; read back
with each trajectory; an unconditional data set unchanged (training on them: tests/test_conditional_eval.py)."""

import hashlib
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY_RUN, compose
from dsno.builders import build_teacher, state_shape
from dsno.config import ConfigError, validate
from dsno.data import (
    CorruptShardError,
    FingerprintMismatchError,
    Manifest,
    TrajectoryDataModule,
    TrajectoryDataset,
    check_fingerprint,
    generate_dataset,
    label_rule,
    load_manifest,
    make_fingerprint,
    trajectory_labels,
    trajectory_noise,
    verify_dataset,
)
from dsno.seeding import LABEL, index_seed
from dsno.stages import trajectories
from test_data_generate import snapshot, start_until

TIMES = [0.75, 0.5, 0.0]
SHAPE = (1, 3, 3)
WEIGHTS = [0.5, 0.3, 0.2]
SEED = 7


def solve(x_T, labels):
    """A cheap stand-in for a conditional solve: state at t_m = x_T (1 + t_m) + t_m + 10 label."""
    t = torch.tensor(TIMES, dtype=x_T.dtype).view(1, -1, 1, 1, 1)
    return x_T[:, None] * (1 + t) + t + 10.0 * labels.to(x_T.dtype).view(-1, 1, 1, 1, 1)


def generate(folder, weights=WEIGHTS, **kw):
    fp = make_fingerprint(teacher={"class": "ToyConditional", "guidance": 0.0},
                          solver={"name": "toy", "order": 1, "options": {}}, grid=[1.0, 0.75, 0.5, 0.25, 0.0],
                          times=TIMES, state_shape=SHAPE, labels=label_rule(weights))
    args = dict(solve=solve, fingerprint=fp, num_trajectories=11, shard_size=3, state_shape=SHAPE, seed=SEED,
                batch_size=2, progress=False)
    return generate_dataset(folder, **{**args, **kw})


def run_generation(out_dir, sleep_per_batch):
    """Entry point for generation in a subprocess (slow solve, so it can be killed mid-shard)."""
    def slow_solve(x_T, labels):
        time.sleep(sleep_per_batch)
        return solve(x_T, labels)

    generate(out_dir, solve=slow_solve, num_trajectories=12, shard_size=4)


# --- the rule ---------------------------------------------------------------------------------------
def test_labels_depend_on_seed_and_index_only():
    labels = trajectory_labels(SEED, 0, 12, [1.0] * 10)
    assert labels.dtype == np.int64
    assert labels.tolist() == [8, 7, 6, 4, 6, 1, 8, 4, 8, 2, 8, 3]       # pinned: data sets stay resumable
    assert np.array_equal(np.concatenate([trajectory_labels(SEED, a, b, [1.0] * 10) for a, b in
                                          ((0, 5), (5, 6), (6, 12))]), labels)
    assert not np.array_equal(trajectory_labels(SEED + 1, 0, 12, [1.0] * 10), labels)
    assert np.array_equal(trajectory_labels(SEED, 0, 12, [2.0] * 10), labels)        # only the shares count


def test_labels_are_the_inverse_cdf_of_the_index_seed():
    n = 4000
    u = np.array([(index_seed(3, g, LABEL) >> 11) / 2**53 for g in range(n)])
    expected = np.where(u < 0.5, 0, np.where(u < 0.8, 1, 2))
    labels = trajectory_labels(3, 0, n, WEIGHTS)
    assert np.array_equal(labels, expected)
    counts = np.bincount(labels, minlength=3)
    chi2 = float((((counts - n * np.array(WEIGHTS)) ** 2) / (n * np.array(WEIGHTS))).sum())
    assert chi2 < 13.8, (counts, chi2)                 # 2 degrees of freedom, p = 0.001
    assert set(trajectory_labels(3, 0, 2000, [1.0, 0.0, 1.0]).tolist()) == {0, 2}   # weight 0: never drawn


def test_bad_class_weights_are_refused():
    for bad in ([], [1.0, -0.5], [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="class weights must be finite numbers >= 0"):
            label_rule(bad)


# --- generation: stored, resumed, across ranks ------------------------------------------------------
def test_labels_are_stored_beside_the_states_and_read_back(tmp_path):
    m = generate(tmp_path)
    assert m.complete and m.roles == ("x_T", "states", "labels")
    labels = np.concatenate([np.load(tmp_path / f"shard-{i:05d}.labels.npy") for i in range(4)])
    assert labels.dtype == np.int64 and np.array_equal(labels, trajectory_labels(SEED, 0, 11, WEIGHTS))
    record = json.loads((tmp_path / "manifest.json").read_text())["shards"][0]["files"]["labels"]
    path = tmp_path / "shard-00000.labels.npy"
    assert record == {"name": path.name, "bytes": path.stat().st_size,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    ds = TrajectoryDataset(tmp_path, verify="full")
    assert ds.has_labels
    x_T, states, label = ds[4]
    assert label.dtype == torch.int64 and int(label) == labels[4]
    assert torch.equal(x_T, trajectory_noise(SEED, 4, 5, SHAPE)[0])
    assert torch.equal(states, solve(x_T[None], label.view(1))[0])
    dm = TrajectoryDataModule(tmp_path, batch_size=4, val_fraction=0.0)
    batch_x_T, batch_states, batch_labels = next(iter(dm.train_dataloader()))
    assert batch_labels.dtype == torch.int64 and batch_labels.shape == (4,)
    assert torch.equal(batch_states, solve(batch_x_T, batch_labels))


def test_sigkill_mid_shard_then_resume_gives_the_same_labels(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    proc = start_until(f"from test_conditional_data import run_generation; run_generation({str(killed)!r}, 0.25)",
                       killed / "shard-00001.labels.npy.tmp")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [s.index for s in load_manifest(killed).shards] == [0]
    generate(killed, num_trajectories=12, shard_size=4)
    generate(reference, num_trajectories=12, shard_size=4)
    assert snapshot(killed) == snapshot(reference)
    assert not any(".tmp" in p.name for p in killed.iterdir())
    verify_dataset(killed, full=True)


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        generate(out_dir)
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_the_labels_of_one_rank(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two")), nprocs=2)
    generate(tmp_path / "one")
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")
    without_group = tmp_path / "parts"
    generate(without_group, rank=1, world_size=2)
    generate(without_group, rank=0, world_size=2)
    assert snapshot(without_group) == snapshot(tmp_path / "one")


# --- verification -----------------------------------------------------------------------------------
def test_a_corrupt_label_file_is_named(tmp_path):
    generate(tmp_path)
    path = tmp_path / "shard-00002.labels.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-00002\.labels\.npy \(shard 2\): sha256"):
        verify_dataset(tmp_path)
    ds = TrajectoryDataset(tmp_path, verify="quick")
    ds[0]
    with pytest.raises(CorruptShardError, match=r"shard-00002\.labels\.npy"):
        ds[7]
    with pytest.raises(CorruptShardError, match=r"shard-00002\.labels\.npy"):   # resuming checks them too
        generate(tmp_path)
    generate(tmp_path, repair=True)
    verify_dataset(tmp_path)
    path.write_bytes(path.read_bytes()[:-8])                                          # truncated
    with pytest.raises(CorruptShardError, match=r"shard-00002\.labels\.npy \(shard 2\): size"):
        TrajectoryDataset(tmp_path, verify="quick")


def test_another_label_rule_is_refused_by_name(tmp_path):
    generate(tmp_path)
    with pytest.raises(FingerprintMismatchError, match=r"labels\.class_weights"):
        generate(tmp_path, weights=[0.2, 0.3, 0.5])


# --- the teacher stage of teacher=mnist_gmm_cond ----------------------------------------------------
def _run(tmp_path, *extra):
    return validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN, "teacher=mnist_gmm_cond", "teacher.size=8",
                            "teacher.per_class=2", f"teacher.path={tmp_path / 'fit.safetensors'}",
                            "data.num_trajectories=12", "data.shard_size=8", "data.batch_size=8", "solver.steps=6",
                            *extra))


@pytest.fixture
def small_fit(tmp_path):
    """A 10 x 2-component 8x8 digit fit (the shipped one is 16x16)."""
    from dsno.teachers.mnist_gmm_cond import main
    main(["--size", "8", "--per-class", "2", "--iters", "5", "--out", str(tmp_path / "fit.safetensors")])


def test_the_teacher_stage_stores_labels_and_fingerprints_guidance_and_weights(tmp_path, small_fit):
    rc = _run(tmp_path, "teacher.guidance=1.5")
    teacher = build_teacher(rc.teacher)
    assert teacher.num_classes == 10 and teacher.guidance == 1.5
    trajectories.generate(rc, teacher, state_shape(teacher), progress=False)
    ds = TrajectoryDataset(rc.data.dir, verify="full")
    labels = torch.stack([ds[i][2] for i in range(len(ds))])
    shares = teacher.class_weights.tolist()
    assert labels.tolist() == trajectory_labels(rc.seed, 0, 12, shares).tolist()
    g = 5
    x_T, states, label = ds[g]
    alone = trajectories.make_solve(teacher, rc.solver, trajectories.solver_grid(teacher, rc.solver, rc.data.times),
                                    rc.data.times)(x_T[None], label.view(1))
    assert torch.equal(states, alone[0])             # the stored states are the guided solve of that label
    unguided = trajectories.make_solve(build_teacher(_run(tmp_path).teacher), rc.solver,
                                       trajectories.solver_grid(teacher, rc.solver, rc.data.times),
                                       rc.data.times)(x_T[None], label.view(1))
    assert (states - unguided[0]).abs().max() > 1e-3

    manifest = load_manifest(rc.data.dir)
    assert manifest.fingerprint["teacher"]["guidance"] == 1.5
    assert manifest.fingerprint["labels"]["class_weights"] == pytest.approx(shares)
    for other, key in ((("teacher.guidance=2.0",), r"teacher\.guidance"),
                       (("data.class_weights=[1,1,1,1,1,1,1,1,1,0]",), r"labels\.class_weights")):
        rc2 = _run(tmp_path, *other)
        t2 = build_teacher(rc2.teacher)
        with pytest.raises(FingerprintMismatchError, match=key):
            check_fingerprint(rc.data.dir, trajectories.expected_fingerprint(rc2, t2, state_shape(t2)))
        with pytest.raises(FingerprintMismatchError, match=key):
            trajectories.generate(rc2, t2, state_shape(t2), progress=False)


def test_class_weights_must_fit_the_teacher(tmp_path, small_fit):
    rc = _run(tmp_path, "data.class_weights=[1,1,1]")
    teacher = build_teacher(rc.teacher)
    with pytest.raises(ConfigError, match=r"data\.class_weights=\[1\.0, 1\.0, 1\.0\]: needs one weight per class .* "
                                          r"\(10 classes\)"):
        trajectories.expected_fingerprint(rc, teacher, state_shape(teacher))
    with pytest.raises(ConfigError, match=r"data\.class_weights=\[1\.0, -1\.0\]: must be finite numbers >= 0"):
        _run(tmp_path, "data.class_weights=[1,-1]")
    plain = validate(compose(f"run_dir={tmp_path / 'plain'}", *TINY_RUN, "data.class_weights=[1,1]"))
    teacher = build_teacher(plain.teacher)
    with pytest.raises(ConfigError, match=r"data\.class_weights=\[1\.0, 1\.0\]: is for a class-conditional teacher"):
        trajectories.expected_fingerprint(plain, teacher, state_shape(teacher))


# --- unconditional data sets and training -----------------------------------------------------------
def test_an_unconditional_fingerprint_is_unchanged(tmp_path):
    rc = validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN))
    teacher = build_teacher(rc.teacher)
    fp = trajectories.expected_fingerprint(rc, teacher, state_shape(teacher))
    assert sorted(fp) == ["dtype", "grid", "solver", "state_shape", "teacher", "times"]
    # the sha256 of this fingerprint before labels existed, as format_version 1 named its keys
    # (state_shape was sample_shape): the data sets made then are still found
    v1 = {("sample_shape" if k == "state_shape" else k): v for k, v in fp.items()}
    assert hashlib.sha256(json.dumps(v1, sort_keys=True).encode()).hexdigest() == (
        "2246cfc9dc8fe14a9ebabba330475f215882a1f4c134b2728f184ccb1db56825")
    old = {"format_version": 1, "fingerprint": v1, "seed": 0, "num_trajectories": 1, "shard_size": 1, "shards": []}
    check_fingerprint(Manifest.from_dict(old), fp)


def test_an_unconditional_run_keeps_its_completion_stamps(tmp_path):
    from dsno.stages.completion import stamp
    rc = validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN))
    # the stamps before data.class_weights existed: a complete run is not redone
    assert [stamp(rc, s) for s in ("train", "export", "eval")] == [
        "ca77a3b59943b247", "e1158e4708b8a9e9", "68b58e2fa5d93483"]
    weighted = validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN, "teacher=mnist_gmm_cond",
                                "data.class_weights=[1,1,1,1,1,1,1,1,1,2]"))
    assert stamp(weighted, "train") != stamp(validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN,
                                                              "teacher=mnist_gmm_cond")), "train")
