"""Training pieces: the loss falls, batches are a pure function of the step, the EMA follows its
rule and resumes exactly, a NaN loss stops training and keeps the last good checkpoint, W&B runs
carry their group, job type and artifacts (offline)."""

import glob
import json
import struct
from pathlib import Path

import pytest
import torch

from dsno.training.ema import averaged_model
from dsno.training.losses import TrajectoryLoss, time_weights
from dsno.training.batch_order import StepBatchOrder


def test_time_weights_follow_sqrt_snr_clamped():
    from dsno import VPSchedule
    s = VPSchedule.linear()
    w = time_weights(s, [0.9, 0.0625, 1e-3], 1.0, 50.0)
    assert w[0] == 1.0                                    # sqrt(SNR) < 1 is clamped up
    assert w[1] == pytest.approx(float(torch.exp(s.lam(0.0625))), rel=1e-6)
    assert w[2] == 50.0                                   # clamped down


def test_loss_weights_and_kinds():
    pred, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    target[:, 2] = 3.0
    loss, per_time = TrajectoryLoss(torch.tensor([1.0, 1.0, 2.0]), "l2")(pred, target)
    assert torch.allclose(per_time, torch.tensor([1.0, 1.0, 9.0]))
    assert loss.item() == pytest.approx((1 + 1 + 18) / 4)
    l1, _ = TrajectoryLoss(torch.ones(3), "l1")(pred, target)
    assert l1.item() == pytest.approx(5 / 3)


def test_step_sampler_is_a_function_of_step_and_rank():
    s = StepBatchOrder(100, 8, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(20)]
    resumed = StepBatchOrder(100, 8, seed=3, start_step=lambda: 7)
    assert next(iter(resumed)) == first[7]
    # one epoch = 12 steps of 8 distinct items
    assert len({i for b in first[:12] for i in b}) == 96
    r0 = StepBatchOrder(100, 4, seed=3, rank=0, world_size=2)
    r1 = StepBatchOrder(100, 4, seed=3, rank=1, world_size=2)
    assert sorted(r0.batch(5) + r1.batch(5)) == sorted(s.batch(5))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchOrder(5, 8)


def test_ema_copies_first_then_follows_the_warmup_rule():
    m = torch.nn.Linear(2, 1, bias=False)
    ema = averaged_model(m, decay=0.2)
    seen = []
    for value in [1.0, 3.0, 7.0, 2.0]:
        with torch.no_grad():
            m.weight.fill_(value)
        ema.update_parameters(m)
        seen.append(ema.module.weight[0, 0].item())
    # update 0 copies; update n >= 1 uses d = min(0.2, (1 + n) / (10 + n)) = 2/11, then the cap 0.2
    e1 = 2 / 11 * 1.0 + 9 / 11 * 3.0
    e2 = 0.2 * e1 + 0.8 * 7.0
    e3 = 0.2 * e2 + 0.8 * 2.0
    assert seen == pytest.approx([1.0, e1, e2, e3], abs=1e-6)
    assert seen[1] != pytest.approx(0.2 * 1.0 + 0.8 * 3.0)   # the warm-up, not the plain decay, at n = 1
    with pytest.raises(ValueError, match="decay"):
        averaged_model(m, decay=1.0)


def test_loss_falls_over_a_few_steps():
    from dsno.nn import build_dsno
    torch.manual_seed(0)
    cfg = {"format_version": 2, "backbone": {"type": "unet", "kwargs": {
        "in_channels": 1, "out_channels": 1, "image_size": 8, "base_channels": 8, "channel_mult": [1, 2],
        "num_res_blocks": 1, "attn_resolutions": []}}, "time_input": "continuous",
        "times": [0.5, 0.25, 0.1, 0.001], "modes": 2, "skip": [0.0] * 4, "state_shape": [1, 8, 8],
        "data_range": [-1, 1], "schedule": {"kind": "linear", "beta_min": 0.1, "beta_max": 20.0}}
    model = build_dsno(cfg)
    x = torch.randn(16, 1, 8, 8)
    target = torch.stack([0.5 * x, 0.3 * x, x.tanh(), x.sign() * 0.5], 1)
    loss_fn = TrajectoryLoss(torch.ones(4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = loss_fn(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_progress_is_a_rich_bar_on_a_terminal_and_log_lines_elsewhere(tiny_run):
    from lightning.pytorch.callbacks import RichProgressBar
    from dsno.stages.training import ProgressLog, progress_callback
    assert isinstance(progress_callback(tiny_run(), tty=True), RichProgressBar)
    quiet = progress_callback(tiny_run("trainer.max_steps=300"), tty=False)
    assert isinstance(quiet, ProgressLog) and quiet.every == 15          # about 20 lines a run


def test_resume_continues_the_same_run(tiny_run, tmp_path, caplog):
    import logging
    from dsno.stages.pipeline import run
    data = f"data.dir={tmp_path / 'data'}"
    last_step = "train.select=last"    # the exported weights checked below are the last step's EMA
    run(tiny_run(data, last_step, run_dir=tmp_path / "full"), through="train")
    with caplog.at_level(logging.INFO, logger="dsno"):
        caplog.clear()         # only this run's lines (an earlier test may have left the dsno logger at INFO)
        run(tiny_run(data, last_step, "trainer.max_steps=3", run_dir=tmp_path / "part"), through="train")
    steps = [r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("train: step")]
    assert steps == ["1/3", "2/3", "3/3"]                 # no terminal under pytest: log lines, not a bar
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["averaging_state"]["n_averaged"].item() == 3        # EMA update s is in the step-s checkpoint
    run(tiny_run(data, last_step, run_dir=tmp_path / "part"), through="train")  # max_steps back to 6, resume=true
    a = _weights(tmp_path / "full" / "checkpoints" / "dsno_ema.safetensors")
    b = _weights(tmp_path / "part" / "checkpoints" / "dsno_ema.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    # the exported weights are the EMA's (the checkpoint's state_dict), not the live ones
    ema = {k[len("model."):]: v for k, v in last["state_dict"].items() if k.startswith("model.")}
    live = {k[len("model."):]: v for k, v in last["current_model_state"].items() if k.startswith("model.")}
    assert all(torch.equal(ema[k], b[k]) for k in b)
    assert any(not torch.equal(live[k], b[k]) for k in b)
    # rerun on the finished run: nothing left to train, the same EMA weights come out
    run(tiny_run(data, last_step, run_dir=tmp_path / "part"), through="train")
    again = _weights(tmp_path / "part" / "checkpoints" / "dsno_ema.safetensors")
    assert all(torch.equal(again[k], b[k]) for k in b)


def test_a_checkpoint_of_the_old_layout_is_refused_in_one_line(tiny_run, tmp_path):
    from dsno.errors import UserError
    from dsno.stages.pipeline import run
    rc = tiny_run("trainer.max_steps=2", run_dir=tmp_path / "run")
    run(rc, through="train")
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    # before: the EMA was a submodule (ema.shadow.*, ema.num_updates) and no callback state held it
    old = {k: v for k, v in ckpt.items() if k not in ("current_model_state", "averaging_state")}
    old["state_dict"] = {**ckpt["current_model_state"], "ema.num_updates": torch.tensor(2),
                         **{f"ema.shadow.{k[len('model.'):]}": v for k, v in ckpt["state_dict"].items()
                            if k.startswith("model.")}}
    torch.save(old, path)
    with pytest.raises(UserError, match=r"last.ckpt holds no EMA of this dsno's checkpoint layout .* use another "
                                        r"run_dir or train.resume=false"):
        run(tiny_run("trainer.max_steps=4", run_dir=tmp_path / "run"), through="train")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_run, tmp_path):
    from dsno.stages.pipeline import run
    from dsno.training.module import DSNOModule, NonFiniteLossError
    rc = tiny_run(run_dir=tmp_path / "nan")
    orig = DSNOModule.training_step

    def poisoned(self, batch, batch_idx):
        if self.global_step >= 2:
            batch = (batch[0] * float("nan"), batch[1])
        return orig(self, batch, batch_idx)

    DSNOModule.training_step = poisoned
    try:
        with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
            run(rc, through="train")
    finally:
        DSNOModule.training_step = orig
    ckpt = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "checkpoints" / "last.ckpt.tmp").exists()


def _wandb_records(run_file):
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks of
    chunks with 7-byte headers, after the 7-byte ':W&B' file header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, block, chunk = open(run_file, "rb").read(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                                      # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):                       # still being written
            return
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):                                # FULL or LAST chunk ends a record
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def _finished_run_file(f, timeout=60.0):
    """Wait for W&B's service process to write a run file out to its exit record (run.finish()
    returns before the file is flushed)."""
    import time
    deadline = time.time() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(f)):
        assert time.time() < deadline, f"{f} has no exit record after {timeout} s"
        time.sleep(0.2)
    return f


def _offline_runs(run_dir):
    """{job_type: {"run": RunRecord, "config": {...}, "artifacts": [...], "history_keys": set()}}."""
    runs = {}
    for f in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        _finished_run_file(f)
        info = {"config": {}, "artifacts": [], "history_keys": set()}
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                info["run"] = r.run
                info["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "config":
                info["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "artifact":
                info["artifacts"].append(r.artifact)
            elif kind == "history":
                info["history_keys"] |= {item.key or item.nested_key[0] for item in r.history.item}
        assert "run" in info, f"{f} holds no run record ({Path(f).stat().st_size} bytes)"
        info["folder"] = Path(f).parent
        runs[info["run"].job_type] = info
    return runs


def test_wandb_offline_runs_share_a_group_and_log_artifacts(tiny_run, tmp_path):
    from dsno.stages.pipeline import run
    rc = tiny_run("logger=wandb", "logger.mode=offline", "eval.nfe=[1]", run_dir=tmp_path / "run")
    run(rc, config={"experiment": rc.experiment})
    runs = _offline_runs(tmp_path / "run")
    assert set(runs) == {"data", "train", "eval"}
    assert {r["run"].run_group for r in runs.values()} == {"mnist_gmm"}
    recorded = json.loads((tmp_path / "run" / "wandb" / "runs.json").read_text())
    assert recorded == {k: runs[k]["run"].run_id for k in ("data", "train")}
    assert runs["eval"]["config"]["train_run_id"] == recorded["train"]
    (manifest,) = runs["data"]["artifacts"]
    assert (manifest.name, manifest.type) == ("trajectories-mnist_gmm", "dataset")
    assert [c.path for c in manifest.manifest.contents] == ["manifest.json"]
    (sampler,) = runs["train"]["artifacts"]
    assert (sampler.name, sampler.type) == ("sampler-mnist_gmm", "model")
    assert {c.path for c in sampler.manifest.contents} >= {"config.json", "weights.safetensors"}
    assert {"val/ema_samples", "val/loss", "train/loss"} <= runs["train"]["history_keys"]
    grids = list((runs["train"]["folder"] / "files" / "media" / "images" / "val").glob("ema_samples_*.png"))
    assert len(grids) == 2                                 # one EMA sample grid per validation (steps 3 and 6)
    eval_keys = runs["eval"]["history_keys"]
    assert "eval/metrics" in eval_keys and any(k.startswith(("eval/comparison", "eval/grid")) for k in eval_keys)
    (table_file,) = (runs["eval"]["folder"] / "files" / "media" / "table" / "eval").glob("metrics_*.table.json")
    table = json.loads(table_file.read_text())
    dsno_row = dict(zip(table["columns"], next(row for row in table["data"] if row[0] == "dsno")))
    assert dsno_row["cost_teacher_evals_min"] <= dsno_row["cost_teacher_evals"] <= dsno_row["cost_teacher_evals_max"]
    assert dsno_row["sec_per_sample_min"] <= dsno_row["sec_per_sample"] <= dsno_row["sec_per_sample_max"]
