"""Generalisation (issue 26): validation on held-out noise beside the same scores on training
trajectories, the checkpoint kept for export chosen on it (train.select), plain distillation (M = 1)
and weight decay."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN

from dsno.config import ConfigError


def _config(run_dir, *extra):
    from conftest import compose
    from dsno.config import validate
    return validate(compose(f"run_dir={run_dir}", *TINY_RUN, *extra))


def _train(run_dir, *extra, through="train"):
    from dsno.stages.pipeline import run
    rc = _config(run_dir, *extra)
    run(rc, through=through)
    return rc


def _record(run_dir):
    return json.loads((Path(run_dir) / "checkpoints" / "validation.json").read_text())


def _data(rc):
    from dsno.training.data import StepTrajectoryData
    data = StepTrajectoryData(rc.data.dir, rc.train.batch_size, val_fraction=rc.data.val_fraction, seed=rc.seed)
    data.setup()
    return data


def _ema_of(run_dir, weights=None):
    """The DSNO of a run with its last checkpoint's EMA weights (or `weights`), float64, eval mode."""
    from dsno.nn import build_dsno
    ckpt_dir = Path(run_dir) / "checkpoints"
    model = build_dsno(json.loads((ckpt_dir / "dsno_config.json").read_text()))
    if weights is None:
        state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["state_dict"]
        weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.double().eval()


@torch.no_grad()
def _rmse_final(model, dataset, indices):
    """sqrt(mean over the trajectories `indices` and their pixels of (DSNO's final state - teacher's)^2)."""
    x_T = torch.stack([dataset[int(i)][0] for i in indices]).double()
    final = torch.stack([dataset[int(i)][1][-1] for i in indices]).double()
    return float((model(x_T)[:, -1] - final).square().mean().sqrt())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny default run (select=best_val, weight_decay=0), validated at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    return _train(run_dir, "data.val_fraction=0.1")


def test_val_noise_never_reaches_training_on_any_rank_or_resume(trained):
    from dsno.data import load_manifest
    from dsno.data.generate import noise_seed
    from dsno.training.batch_order import StepBatchOrder
    data = _data(trained)
    train, val = data.split_indices()
    subset = data.train_subset_indices()
    assert len(val) == round(64 * 0.1) and len(subset) == len(val)
    assert not set(train) & set(val) and set(subset) <= set(train)
    seed = load_manifest(trained.data.dir).seed
    assert not {noise_seed(seed, int(g)) for g in train} & {noise_seed(seed, int(g)) for g in val}
    seen = {data.dataset[int(g)][0].numpy().tobytes() for g in train}
    assert not any(data.dataset[int(g)][0].numpy().tobytes() in seen for g in val)
    # every batch of every rank, over more than one epoch, draws training trajectories only
    for world in (1, 2):
        for rank in range(world):
            order = StepBatchOrder(len(data.train_set), 4, trained.seed, rank, world)
            drawn = {int(data.train_set.indices[i]) for step in range(40) for i in order.batch(step)}
            assert drawn <= set(train) and not drawn & set(val)
    # a resumed run splits the same way; another seed (or data set) would not, and the resume refuses it
    assert _data(trained).split_record() == data.split_record()
    other = _data(_config(trained.run_dir, "data.val_fraction=0.1", "seed=1"))
    assert other.split_record() != data.split_record()


def test_gap_metrics_are_logged_and_scored_on_the_right_trajectories(trained):
    record = _record(trained.run_dir)
    rows = record["rows"]
    assert [r["step"] for r in rows] == [3, 6]
    assert record["trajectories"] == {"val": 6, "train_subset": 6}
    data = _data(trained)
    _, val = data.split_indices()
    model = _ema_of(trained.run_dir)                 # the EMA weights of step 6, the last validation
    last = rows[-1]
    assert last["val/rmse_final"] == pytest.approx(_rmse_final(model, data.dataset, val), rel=1e-5)
    assert last["train_subset/rmse_final"] == pytest.approx(
        _rmse_final(model, data.dataset, data.train_subset_indices()), rel=1e-5)
    assert last["gap/rmse_final"] == pytest.approx(last["val/rmse_final"] - last["train_subset/rmse_final"])
    assert all(r["val/loss"] > 0 and r["train_subset/loss"] > 0 for r in rows)
    # the same values in the training log (CSV), at the validation steps, beside the training loss
    (metrics,) = (Path(trained.run_dir) / "logs").glob("*/metrics.csv")
    logged = [r for r in csv.DictReader(metrics.open()) if r.get("val/rmse_final")]
    assert [int(r["step"]) for r in logged] == [3, 6]
    assert float(logged[-1]["train_subset/rmse_final"]) == pytest.approx(last["train_subset/rmse_final"], rel=1e-6)
    assert any(r.get("train/loss") for r in csv.DictReader(metrics.open()))


def _poisoned(monkeypatch, from_step=2):
    """From `from_step` on, training pulls the states to -3 times themselves: held-out RMSE rises after it."""
    from dsno.training.module import DSNOModule
    orig = DSNOModule.training_step

    def poisoned(self, batch, batch_idx):
        if self.global_step >= from_step:
            batch = (batch[0], -3.0 * batch[1])
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(DSNOModule, "training_step", poisoned)


POISON = ["train.lr=0.01", "trainer.val_check_interval=1"]


def test_best_val_exports_the_lowest_val_step_and_resume_keeps_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    _poisoned(monkeypatch)
    data = f"data.dir={tmp_path / 'data'}"
    full = _train(tmp_path / "full", data, *POISON)
    record = _record(full.run_dir)
    vals = {r["step"]: r["val/rmse_final"] for r in record["rows"]}
    assert sorted(vals) == [1, 2, 3, 4, 5, 6]
    best = min(vals, key=vals.get)
    assert best < 6 and vals[6] > vals[best]               # the last step is not the best
    assert record["best_step"] == record["selected_step"] == best
    exported = load_file(str(tmp_path / "full" / "checkpoints" / "dsno_ema.safetensors"))
    d = _data(full)
    assert _rmse_final(_ema_of(full.run_dir, exported), d.dataset, d.split_indices()[1]) == pytest.approx(
        vals[best], rel=1e-5)
    # killed at step 4 (a checkpoint every step) and resumed to 6: the same record and the same weights
    part = tmp_path / "part"
    _train(part, data, *POISON, "trainer.max_steps=4")
    ckpt = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt_state = next(v for k, v in ckpt["callbacks"].items() if "HeldOutValidation" in k)
    assert ckpt_state["best_step"] == best and [r["step"] for r in ckpt_state["rows"]] == [1, 2, 3, 4]
    _train(part, data, *POISON)
    assert _record(part) == record
    resumed = load_file(str(part / "checkpoints" / "dsno_ema.safetensors"))
    assert all(torch.equal(resumed[k], exported[k]) for k in exported)
    # select=last on the finished run: nothing trains again, the last step's EMA is kept, as before validation chose
    last = _train(full.run_dir, data, *POISON, "train.select=last")
    assert _record(last.run_dir)["selected_step"] == 6 and _record(last.run_dir)["best_step"] == best
    assert torch.load(Path(last.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    kept = load_file(str(Path(last.run_dir) / "checkpoints" / "dsno_ema.safetensors"))
    ema = _ema_of(last.run_dir).float().state_dict()
    assert all(torch.equal(kept[k], ema[k]) for k in kept) and any(not torch.equal(kept[k], exported[k]) for k in kept)


def test_weight_decay_reaches_the_optimizer(trained, tmp_path):
    from dsno.nn import build_dsno
    from dsno.training.losses import TrajectoryLoss
    from dsno.training.module import DSNOModule
    model = build_dsno(json.loads((Path(trained.run_dir) / "checkpoints" / "dsno_config.json").read_text()))
    plain = DSNOModule(model, TrajectoryLoss(torch.ones(4)), lr=1e-3).configure_optimizers()["optimizer"]
    assert type(plain) is torch.optim.Adam and plain.param_groups[0]["weight_decay"] == 0
    decayed = DSNOModule(model, TrajectoryLoss(torch.ones(4)), lr=1e-3, weight_decay=0.05)
    opt = decayed.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.05
    # through the config: the run's checkpoint holds the optimizer it trained with
    group = torch.load(Path(trained.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)[
        "optimizer_states"][0]["param_groups"][0]
    assert group["weight_decay"] == 0 and not group.get("decoupled_weight_decay", False)
    rc = _train(tmp_path / "wd", f"data.dir={trained.data.dir}", "data.val_fraction=0.1", "train.weight_decay=0.05",
                "trainer.max_steps=1")
    group = torch.load(Path(rc.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)[
        "optimizer_states"][0]["param_groups"][0]
    assert group["weight_decay"] == 0.05 and group["decoupled_weight_decay"] is True


def test_plain_distillation_m1_trains_and_exports(tmp_path):
    from dsno import load_sampler
    from dsno.nn.temporal import TemporalConv
    rc = _train(tmp_path / "m1", "data.times=[0.001]", "model.modes=1", through="export")
    sampler = load_sampler(tmp_path / "m1" / "sampler")
    assert list(sampler.times) == pytest.approx([0.001])
    x = torch.randn(3, *_shape(rc))
    out = sampler(x)
    assert out.shape == (3, 1, *x.shape[1:]) and torch.isfinite(out).all()
    model = _ema_of(tmp_path / "m1")
    layers = [m for m in model.modules() if isinstance(m, TemporalConv)]
    assert layers and all(torch.count_nonzero(layer.weight) == 0 for layer in layers)   # the identity
    # only the backbone trains: the optimizer holds every other parameter, each with a nonzero moment
    opt = torch.load(tmp_path / "m1" / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]
    temporal = sum(1 for layer in layers for _ in layer.parameters())
    assert len(opt["param_groups"][0]["params"]) == len(list(model.parameters())) - temporal
    assert all(torch.count_nonzero(s["exp_avg_sq"]) > 0 for s in opt["state"].values())
    rows = _record(tmp_path / "m1")["rows"]
    assert rows and all(math.isfinite(r["val/rmse_final"]) for r in rows)


def _shape(rc):
    from dsno.builders import build_teacher, state_shape
    return state_shape(build_teacher(rc.teacher))


BAD = [
    (["data.times=[]"], "data.times=[]: needs at least 1 output time"),
    (["data.times=[0.001]"], "model.modes=2: must be <= M // 2 + 1 = 1 for M = 1 output times"),
    (["data.val_fraction=0"], "train.select='best_val': needs held-out trajectories: set data.val_fraction > 0"),
    (["train.select=best"], "train.select='best': must be one of best_val, last"),
    (["train.weight_decay=-1"], "train.weight_decay=-1.0: must lie in [0, 1000]"),
]


def test_generalisation_keys_are_checked_in_one_line(tmp_path):
    for override, message in BAD:
        with pytest.raises(ConfigError) as e:
            _config(tmp_path / "r", *override)
        assert message in str(e.value) and "\n" not in str(e.value), override
    # allowed: plain distillation, and no held-out trajectories when the last step is kept
    rc = _config(tmp_path / "r", "data.times=[0.001]", "model.modes=1", "data.val_fraction=0", "train.select=last")
    assert list(rc.data.times) == [0.001] and (rc.train.select, rc.data.val_fraction) == ("last", 0)


def test_resume_with_another_split_is_refused_in_one_line(trained):
    """Last in this file: it starts a run in `trained`'s folder (refused before any write)."""
    from dsno.errors import UserError
    from dsno.stages.pipeline import run
    with pytest.raises(UserError, match=r"last.ckpt was trained with another train/val split \(64 trajectories, 6 held "
                                        r"out.*now 64 trajectories, 13 held out.*train.resume=false"):
        run(_config(trained.run_dir, "data.val_fraction=0.2", "trainer.max_steps=7"), through="train")
