"""train.fresh_per_step: each step's fresh teacher trajectories are exactly those the teacher stage would
store past the stored set (x_T, states and labels), never a stored or another step's or rank's, trained
beside the stored batch of StepBatchOrder, and resumed exactly; the key's bounds in one line."""

import json

import pytest
import torch

from conftest import TINY_RUN, compose
from dsno.builders import build_teacher, state_shape
from dsno.config import ConfigError, check_trainer_hardware, validate
from dsno.data import DatasetError, TrajectoryDataset, load_manifest
from dsno.data.stream import FreshStream, fresh_indices
from dsno.stages import pipeline, trajectories
from dsno.training.batch_order import StepBatchOrder
from dsno.training.data import StepTrajectoryData
from dsno.training.module import DSNOModule

N = 64          # stored trajectories of the tiny runs (TINY_RUN)
B = 8           # train.batch_size of the tiny runs


@pytest.fixture(scope="module")
def cond_fit(tmp_path_factory):
    """A tiny class-conditional mixture teacher's weights file (mnist_gmm_cond, 8x8, 2 components a class)."""
    from dsno.teachers.mnist_gmm_cond import main
    path = tmp_path_factory.mktemp("cond") / "fit.safetensors"
    main(["--size", "8", "--per-class", "2", "--iters", "5", "--out", str(path)])
    return path


def _config(run_dir, *extra):
    return validate(compose(f"run_dir={run_dir}", *TINY_RUN, *extra))


def _teacher_args(kind, cond_fit):
    if kind == "mnist_gmm":
        return ()
    return ("teacher=mnist_gmm_cond", "teacher.size=8", "teacher.per_class=2", f"teacher.path={cond_fit}",
            "teacher.guidance=1.0")


def _data(rc, teacher, fresh_per_step):
    return StepTrajectoryData(rc.data.dir, rc.train.batch_size, val_fraction=rc.data.val_fraction, seed=rc.seed,
                              fresh_per_step=fresh_per_step,
                              fresh_solve=lambda device: trajectories.teacher_solve(rc, teacher, device))


@pytest.mark.parametrize("kind", ["mnist_gmm", "mnist_gmm_cond"])
def test_fresh_trajectories_are_those_the_teacher_stage_stores_past_the_stored_set(kind, cond_fit, tmp_path):
    k, f = 6, 3
    extra = _teacher_args(kind, cond_fit)
    rc = _config(tmp_path / "run", *extra, "data.num_trajectories=16", "data.shard_size=16",
                 f"data.dir={tmp_path / 'stored'}")
    more = _config(tmp_path / "run", *extra, f"data.num_trajectories={16 + k}", "data.shard_size=16",
                   f"data.dir={tmp_path / 'more'}")
    teacher = build_teacher(rc.teacher)
    for c in (rc, more):
        trajectories.generate(c, teacher, state_shape(teacher), progress=False)
    oracle = TrajectoryDataset(more.data.dir)
    fresh = _data(rc, teacher, f).fresh
    assert fresh.stream.num_stored == 16 and fresh.stream.seed == rc.seed
    for step, rank, world in ((0, 0, 1), (1, 0, 1), (0, 1, 2)):       # trajectories 16-18, 19-21 and 19-21
        batch = fresh.batch(step, rank, world, torch.device("cpu"))
        assert len(batch) == (2 if kind == "mnist_gmm" else 3)
        for j, g in enumerate(fresh_indices(16, f, step, rank, world)):
            stored = oracle[g]
            assert torch.equal(batch[0][j], stored[0])                           # x_T: the same bits
            assert torch.allclose(batch[1][j], stored[1], rtol=1e-5, atol=1e-6)  # states: the same solve
            if kind == "mnist_gmm_cond":
                assert int(batch[2][j]) == int(stored[2])
    if kind == "mnist_gmm_cond":     # guidance makes the label matter: another label gives other states
        x_T, labels = fresh.stream.inputs(0)
        solve = fresh.solve_on(torch.device("cpu"))
        assert not torch.allclose(solve(x_T, labels), solve(x_T, (labels + 1) % teacher.num_classes), atol=1e-3)
    assert fresh.seconds > 0


def test_fresh_indices_never_meet_each_other_nor_the_stored_set():
    for world in (1, 2, 3):
        for f in (1, 4):
            seen = [g for s in range(7) for r in range(world) for g in fresh_indices(N, f, s, r, world)]
            assert len(seen) == len(set(seen)) == 7 * world * f
            assert sorted(seen) == list(range(N, N + 7 * world * f))      # packed right after the stored set
    assert fresh_indices(N, 3, step=5, rank=1, world_size=2) == range(N + 33, N + 36)
    assert len(fresh_indices(N, 0, 5)) == 0
    stream = FreshStream(seed=3, num_stored=N, per_step=2, state_shape=(1, 4, 4))
    a, labels = stream.inputs(4, 1, 2)
    assert labels is None and a.shape == (2, 1, 4, 4)
    assert torch.equal(a, stream.inputs(4, 1, 2)[0])                            # a function of (step, rank, world)
    assert not torch.equal(a, stream.inputs(4, 0, 2)[0]) and not torch.equal(a, stream.inputs(5, 1, 2)[0])
    for bad in (dict(step=-1), dict(rank=2), dict(world_size=0)):
        with pytest.raises(ValueError):
            fresh_indices(N, 2, **{"step": 0, "rank": 0, "world_size": 2, **bad})


def _recording_fit(rc, seen):
    """Train rc through the train stage, recording (global step, batch) of every training step."""
    orig = DSNOModule.training_step

    def recording(self, batch, batch_idx):
        seen.append((self.global_step, [t.clone() for t in batch]))
        return orig(self, batch, batch_idx)

    mp = pytest.MonkeyPatch()
    mp.setattr(DSNOModule, "training_step", recording)
    try:
        pipeline.run(rc, through="train")
    finally:
        mp.undo()


def _weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(run_dir / "checkpoints" / "dsno_ema.safetensors"))


@pytest.mark.parametrize("f", [3, B])
def test_each_step_trains_its_stored_batch_and_its_fresh_trajectories_and_resumes_exactly(f, tmp_path):
    data_dir = f"data.dir={tmp_path / 'data'}"
    args = (data_dir, f"train.fresh_per_step={f}", "train.select=last")
    full = _config(tmp_path / "full", *args)
    seen: list = []
    _recording_fit(full, seen)
    assert [s for s, _ in seen] == list(range(6))
    teacher = build_teacher(full.teacher)
    data = _data(full, teacher, f)
    data.setup()
    order = StepBatchOrder(len(data.train_set), B - f, full.seed) if f < B else None
    for step, (x_T, states) in seen:
        assert len(x_T) == B
        fresh_x, fresh_states = data.fresh.batch(step, 0, 1, torch.device("cpu"))
        assert torch.equal(x_T[B - f:], fresh_x) and torch.allclose(states[B - f:], fresh_states)
        stored = [data.train_set[i] for i in order.batch(step)] if order else []
        assert torch.equal(x_T[:B - f], torch.stack([s[0] for s in stored]) if stored else x_T[:0])
    metrics = (tmp_path / "full" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    column = metrics[0].split(",").index("train/fresh_solve_s")
    solve_s = [float(r.split(",")[column]) for r in metrics[1:] if r.split(",")[column]]
    assert len(solve_s) == 6 and all(s > 0 for s in solve_s)

    part = tmp_path / "part"
    pipeline.run(_config(part, *args, "trainer.max_steps=3"), through="train")
    resumed: list = []
    _recording_fit(_config(part, *args), resumed)              # max_steps back to 6, train.resume=true
    assert [s for s, _ in resumed] == [3, 4, 5]
    for (_, a), (_, b) in zip(seen[3:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    a, b = _weights(tmp_path / "full"), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_all_fresh_reads_no_stored_training_trajectory(tmp_path):
    rc = _config(tmp_path / "run", f"train.fresh_per_step={B}")
    pipeline.make_data(rc)
    data = _data(rc, build_teacher(rc.teacher), B)
    x_T, states = next(iter(data.train_dataloader()))
    shape = tuple(data.state_shape)
    assert x_T.shape == (0, *shape) and states.shape == (0, len(rc.data.times), *shape)
    assert data.stored_per_step == 0 and _data(rc, None, 0).stored_per_step == B and _data(rc, None, 0).fresh is None


def test_fresh_per_step_bounds_are_one_config_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^config error: train.fresh_per_step=9: must be at most 8: the fresh "
                                          r"trajectories are part of each step's train.batch_size=8$"):
        _config(tmp_path, "train.fresh_per_step=9")
    with pytest.raises(ConfigError, match=r"^config error: train.fresh_per_step=-1: must be an integer >= 0$"):
        _config(tmp_path, "train.fresh_per_step=-1")
    assert _config(tmp_path, "train.fresh_per_step=8").train.fresh_per_step == 8
    assert _config(tmp_path).train.fresh_per_step == 0
    # only the stored part of a batch must fit the train split: 16 trajectories, 1 held out, 15 to train on
    small = ("data.num_trajectories=16", "trainer.accelerator=cpu", "train.batch_size=20")
    check_trainer_hardware(_config(tmp_path, *small, "train.fresh_per_step=5"))
    check_trainer_hardware(_config(tmp_path, *small, "train.fresh_per_step=20"))
    with pytest.raises(ConfigError, match=r"^config error: train.batch_size=20: less train.fresh_per_step=4 leaves "
                                          r"16 stored trajectories a step, which exceeds the 15 training trajectories "
                                          r".*; use at most 19 or make more trajectories$"):
        check_trainer_hardware(_config(tmp_path, *small, "train.fresh_per_step=4"))
    with pytest.raises(ConfigError, match=r"^config error: train.batch_size=20: exceeds the 15 training"):
        check_trainer_hardware(_config(tmp_path, *small))


def test_a_data_set_of_another_noise_rule_is_refused_in_one_line(tmp_path):
    rc = _config(tmp_path / "run", "train.fresh_per_step=2")
    pipeline.make_data(rc)
    manifest = tmp_path / "run" / "trajectories" / "manifest.json"
    record = json.loads(manifest.read_text())
    record["noise"] = "x_T of trajectory g = numpy.random.default_rng(g).standard_normal(shape)"
    manifest.write_text(json.dumps(record))
    assert load_manifest(manifest.parent).noise == record["noise"]
    with pytest.raises(DatasetError, match=r"records another noise rule .* than dsno's trajectory_noise, so fresh "
                                           r"trajectories cannot continue it: .* or set train.fresh_per_step=0"):
        _data(rc, None, 2)
    assert _data(rc, None, 0).fresh is None        # stored trajectories only: the rule is not needed


def test_fresh_trajectories_change_what_training_makes_and_a_run_without_them_stays_complete(tiny_run, tmp_path):
    from dsno.stages.completion import stamp
    base = tiny_run()
    assert stamp(base, "train") == "ca77a3b59943b247"     # the stamp before the key existed (test_conditional_data)
    assert stamp(tiny_run("train.fresh_per_step=2"), "train") != stamp(base, "train")
