"""Training pieces: the loss falls, batches are a pure function of the step, resume is exact,
a NaN loss stops training and keeps the last good checkpoint."""

import pytest
import torch

from dsno.training.ema import EMA
from dsno.training.losses import TrajectoryLoss, time_weights
from dsno.training.sampler import StepBatchSampler


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
    s = StepBatchSampler(100, 8, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(20)]
    resumed = StepBatchSampler(100, 8, seed=3, start_step=lambda: 7)
    assert next(iter(resumed)) == first[7]
    # one epoch = 12 steps of 8 distinct items
    assert len({i for b in first[:12] for i in b}) == 96
    r0 = StepBatchSampler(100, 4, seed=3, rank=0, world_size=2)
    r1 = StepBatchSampler(100, 4, seed=3, rank=1, world_size=2)
    assert sorted(r0.batch(5) + r1.batch(5)) == sorted(s.batch(5))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(5, 8)


def test_ema_tracks_weights():
    m = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    start = ema.shadow.weight.clone()
    ema.update(m)                                         # d = min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow.weight, 0.1 * start + 0.9)


def test_loss_falls_over_a_few_steps():
    from dsno.nn import build_dsno
    torch.manual_seed(0)
    cfg = {"format_version": 1, "backbone": {"type": "unet", "kwargs": {
        "in_channels": 1, "out_channels": 1, "image_size": 8, "base_channels": 8, "channel_mult": [1, 2],
        "num_res_blocks": 1, "attn_resolutions": []}}, "time_input": "continuous",
        "times": [0.5, 0.25, 0.1, 0.001], "modes": 2, "skip": [0.0] * 4, "image_shape": [1, 8, 8],
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


def test_resume_continues_the_same_run(tiny_run, tmp_path):
    from dsno.stages.training import run
    full = tiny_run(run_dir=tmp_path / "full")
    run(full, evaluate=False)
    part = tiny_run("trainer.max_steps=3", run_dir=tmp_path / "part")
    run(part, evaluate=False)
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    resumed = tiny_run(run_dir=tmp_path / "part")            # max_steps back to 6, resume=true
    run(resumed, evaluate=False)
    a = _weights(tmp_path / "full" / "checkpoints" / "dsno_ema.safetensors")
    b = _weights(tmp_path / "part" / "checkpoints" / "dsno_ema.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_run, tmp_path):
    from dsno.stages.training import run
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
            run(rc, evaluate=False)
    finally:
        DSNOModule.training_step = orig
    ckpt = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "checkpoints" / "last.ckpt.tmp").exists()
