"""The PSLD score network teacher (teacher=psld_unet): its training input and loss against the PSLD
kernel, its reading of eps as score and x0 (oracles: the exact PSLD mixture), its file record, the
shipped weights, and the PSLD samplers on it."""

from __future__ import annotations

import math
import re

import pytest
import torch

from dsno.processes.psld import PSLD
from dsno.teachers.psld_gmm import PSLDGaussianMixture
from dsno.teachers.psld_unet import PSLDUNetTeacher, load_psld_unet_teacher
from dsno.teachers.train_unet import (TrainSettings, dsm_loss, evaluation_loss, main, make_record, noise_shape,
                                      noisy_input, save_teacher, train)
from dsno.teachers.unet import asset_path, read_record

TIMES = torch.tensor([1e-3, 0.05, 0.4, 1.0], dtype=torch.float64)


def tiny_settings(**kw) -> TrainSettings:
    base = dict(size=8, steps=3, batch_size=8, base_channels=8, channel_mult=[1, 2], attn_resolutions=[4],
                warmup_steps=1, schedule=PSLD().to_dict())
    return TrainSettings(**{**base, **kw})


def mixture(seed: int = 0, shape=(1, 4, 4)) -> PSLDGaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, *shape, dtype=torch.float64, generator=g)
    variances = torch.rand(3, *shape, dtype=torch.float64, generator=g) + 0.1
    return PSLDGaussianMixture(means, variances, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))


def test_noisy_input_is_the_psld_perturbation_kernel():
    """z_t = Phi (x0, 0) + L_t eps: unit data give Phi's first column, unit noise L_t's columns, and
    L_t L_t^T is the kernel covariance of z_t given x0 (m0 ~ N(0, kappa M) folded in)."""
    proc = PSLD()
    b = len(TIMES)
    one, zero = torch.ones(b, 1, 1, 1, dtype=torch.float64), torch.zeros(b, 1, 1, 1, dtype=torch.float64)
    mean = noisy_input(proc, one, TIMES, torch.zeros(b, 2, 1, 1, dtype=torch.float64))[:, :, 0, 0]
    col_x = noisy_input(proc, zero, TIMES, torch.cat([one, zero], 1))[:, :, 0, 0]
    col_m = noisy_input(proc, zero, TIMES, torch.cat([zero, one], 1))[:, :, 0, 0]
    phi, _ = proc.transition(0.0, TIMES)
    torch.testing.assert_close(mean, phi[:, :, 0], rtol=1e-13, atol=1e-15)
    lt = torch.stack([col_x, col_m], dim=-1)
    assert float(lt[:, 0, 1].abs().max()) == 0.0                              # lower triangular
    torch.testing.assert_close(lt @ lt.transpose(1, 2), proc.marginal_cov(TIMES, 0.0), rtol=1e-12, atol=1e-15)
    assert noise_shape(proc, torch.zeros(5, 3, 8, 8)) == (5, 6, 8, 8)


def test_dsm_loss_is_zero_for_the_exact_eps_of_a_point_mass():
    """Data at one point: the marginal is the kernel itself, whose exact eps is the noise drawn."""
    mu = torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64)
    point = PSLDGaussianMixture(mu, torch.full((1,), 1e-14, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(TIMES), 2, 4, 4, dtype=torch.float64, generator=g)
    x0 = mu.expand(len(TIMES), -1, -1, -1)
    assert float(dsm_loss(point.eps, x0, TIMES, noise, point.process)) < 1e-12
    assert float(dsm_loss(lambda z, t: torch.zeros_like(z), x0, TIMES, noise, point.process)) == pytest.approx(
        float(noise.square().mean()), rel=1e-12)


def test_x0_and_score_read_from_eps_match_the_exact_mixture():
    """Tweedie's E[x0 | z_t] = (x_t - L_00 eps_x) / Phi_00 and score = -L_t^-T eps, on the exact mixture."""
    teacher = mixture()
    z = torch.randn(len(TIMES), 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    eps = teacher.eps(z, TIMES)
    torch.testing.assert_close(teacher.x0_from_eps(z, eps, TIMES), teacher.x0(z, TIMES), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(teacher.score_from_eps(eps, TIMES), teacher.score(z, TIMES), rtol=1e-10, atol=1e-10)


def test_network_teacher_reads_its_network_as_eps():
    torch.manual_seed(0)
    teacher = PSLDUNetTeacher(tiny_settings().network_kwargs(), PSLD()).eval()
    with torch.no_grad():
        for p in teacher.network.parameters():
            p.add_(torch.randn_like(p) * 0.05)          # the UNet starts with a zero output layer
        z = torch.randn(4, 2, 8, 8)
        raw = teacher.network(z, TIMES.float())
        eps, score, x0 = teacher.eps(z, TIMES), teacher.score(z, TIMES), teacher.x0(z, TIMES)
    assert raw.abs().mean() > 1e-3 and eps.dtype == torch.float64
    torch.testing.assert_close(eps, raw.double(), rtol=0, atol=0)
    torch.testing.assert_close(score, teacher.score_from_eps(raw, TIMES))
    torch.testing.assert_close(x0, teacher.x0_from_eps(z, raw, TIMES))
    assert teacher.state_shape == (2, 8, 8) and teacher.data_channels == 1 and teacher.augmented
    assert teacher.prior_scale().flatten().tolist() == [1.0, math.sqrt(PSLD().M)]
    with pytest.raises(ValueError, match=r"z must be \[B, 2, 8, 8\]"):
        teacher.eps(torch.zeros(2, 1, 8, 8), 0.5)
    with pytest.raises(ValueError, match="takes and predicts the 2C channels"):
        PSLDUNetTeacher({**tiny_settings().network_kwargs(), "in_channels": 3, "out_channels": 3}, PSLD())


def test_psld_training_lowers_the_loss_and_its_file_loads_as_psld_unet_only(tmp_path):
    from dsno.builders import build_teacher
    from dsno.config import validate
    from dsno.digits import load_digits
    from dsno.teachers.base import TeacherLoadError
    from conftest import compose
    settings = tiny_settings(steps=40, lr=2e-3)
    images = load_digits(8)[0][:256]
    proc = settings.process
    network, summary = train(settings, images, log=lambda line: None)
    untrained = PSLDUNetTeacher(settings.network_kwargs(), proc).network
    assert summary["eval_loss_ema"] < 0.8 * evaluation_loss(untrained, images, proc, settings.t_min)
    out = tmp_path / "psld.safetensors"
    save_teacher(out, network, make_record(settings, summary, "python -m dsno.teachers.train_unet --schedule psld"))
    record = read_record(out, expected="dsno.psld_unet_teacher")
    assert record["process"] == PSLD().to_dict() and "schedule" not in record and record["name"] == "mnist_psld_unet8"

    rc = validate(compose("experiment=mnist_unet_psld", f"teacher.path={out}", "teacher.size=8"))
    teacher = build_teacher(rc.teacher)
    assert isinstance(teacher, PSLDUNetTeacher) and teacher.process == PSLD()
    z = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher.eps(z, 0.3), network(z, torch.full((2,), 0.3)).double())
    assert teacher.fingerprint()["process"]["kind"] == "psld"

    vp = tmp_path / "vp.safetensors"
    vp_settings = TrainSettings(size=8, steps=1, batch_size=4, base_channels=8, attn_resolutions=[4])
    vp_net, vp_summary = train(vp_settings, images[:16], log=lambda line: None)
    save_teacher(vp, vp_net, make_record(vp_settings, vp_summary, "python -m dsno.teachers.train_unet"))
    with pytest.raises(TeacherLoadError, match="holds a dsno.unet_teacher record, a teacher for teacher.kind=unet, "
                                               "not teacher.kind=psld_unet"):
        build_teacher(validate(compose("experiment=mnist_unet_psld", f"teacher.path={vp}",
                                       "teacher.size=8")).teacher)
    with pytest.raises(TeacherLoadError, match="a teacher for teacher.kind=psld_unet, not teacher.kind=unet"):
        build_teacher(validate(compose("teacher=unet", f"teacher.path={out}", "teacher.size=8")).teacher)


@pytest.mark.parametrize("process,message", [
    ({"kind": "linear"}, "its record's process: not a PSLD record (kind 'psld')"),
    ({"kind": "psld", "mass": 2.0}, "not a PSLD record (PSLD.__init__() got an unexpected keyword argument 'mass')"),
    ({"kind": "psld", "m_inv": -1.0}, "PSLD needs M^-1 > 0"),
    ("psld", "its record's process: not a PSLD record (kind 'psld')"),
])
def test_a_weights_file_with_a_bad_process_record_is_one_line(tmp_path, process, message):
    from dsno.builders import build_teacher
    from dsno.config import validate
    from dsno.teachers.base import TeacherLoadError
    from conftest import compose
    settings = tiny_settings(steps=1)
    record = make_record(settings, {"eval_loss_ema": 1.0}, "python -m dsno.teachers.train_unet --schedule psld")
    out = tmp_path / "bad.safetensors"
    save_teacher(out, PSLDUNetTeacher(settings.network_kwargs(), PSLD()).network, {**record, "process": process})
    with pytest.raises(TeacherLoadError, match=re.escape(message)) as e:
        build_teacher(validate(compose("experiment=mnist_unet_psld", f"teacher.path={out}", "teacher.size=8")).teacher)
    assert "\n" not in str(e.value) and str(out) in str(e.value)


@pytest.mark.parametrize("kind", ["unet", "psld_unet"])
def test_a_record_whose_backbone_is_malformed_is_one_line(tmp_path, kind):
    from dsno.builders import build_teacher
    from dsno.config import validate
    from dsno.teachers.base import TeacherLoadError
    from conftest import compose
    settings = tiny_settings(steps=1) if kind == "psld_unet" else TrainSettings(size=8, base_channels=8,
                                                                                  attn_resolutions=[4])
    record = make_record(settings, {"eval_loss_ema": 1.0}, "python -m dsno.teachers.train_unet")
    out = tmp_path / "bad.safetensors"
    from dsno.nn.unet import UNet
    save_teacher(out, UNet(**settings.network_kwargs()), {**record, "backbone": {"type": "unet", "kwargs": "big"}})
    experiment = "experiment=mnist_unet_psld" if kind == "psld_unet" else "experiment=mnist_unet_cpu"
    with pytest.raises(TeacherLoadError, match="cannot load the teacher") as e:
        build_teacher(validate(compose(experiment, f"teacher.path={out}", "teacher.size=8")).teacher)
    assert "\n" not in str(e.value)


def test_missing_weights_and_bad_cli_flags_say_how_to_fix_them(tmp_path, capsys):
    from dsno.errors import UserFileNotFoundError
    missing = tmp_path / "none.safetensors"
    with pytest.raises(UserFileNotFoundError, match=f"--schedule psld --out {missing}"):
        load_psld_unet_teacher(missing)
    for argv, message in ((["--psld", "nu=3"], "--psld sets PSLD parameters and needs --schedule psld"),
                          (["--schedule", "psld", "--psld", "gamma=-1"], "PSLD needs gamma >= 0"),
                          (["--schedule", "psld", "--psld", "mass=2"], "KEY one of beta_min, beta_max, nu"),
                          (["--schedule", "psld", "--psld", "nu=fast"], "--psld nu= needs a number")):
        with pytest.raises(SystemExit):
            main([*argv, "--steps", "1", "--out", str(tmp_path / "x.safetensors")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_shipped_psld_teacher_is_a_trained_score_of_the_digits():
    """The shipped weights load under their recorded PSLD, were made by the recorded command, and their
    denoised output at a small time is close to the clean digits (a trained score, not noise)."""
    from dsno.digits import load_digits
    path = asset_path(16, psld=True)
    record = read_record(path, expected="dsno.psld_unet_teacher")
    assert record["command"] == "python -m dsno.teachers.train_unet --size 16 --steps 4000 --seed 0 --schedule psld"
    teacher = load_psld_unet_teacher()
    assert teacher.process == PSLD() and teacher.state_shape == (2, 16, 16)
    images = load_digits(16)[0][:128]
    proc = teacher.process
    t = torch.full((len(images),), 0.05, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    z = noisy_input(proc, images.double(), t, torch.randn(len(images), 2, 16, 16, dtype=torch.float64, generator=g))
    with torch.no_grad():
        x0 = teacher.x0(z, t)
    noisy_rmse = float((z[:, :1] / proc.transition(0.0, 0.05)[0][0, 0] - images).square().mean().sqrt())
    denoised_rmse = float((x0 - images).square().mean().sqrt())
    assert denoised_rmse < 0.5 * noisy_rmse
    # the recorded EMA loss, recomputed on the same 1,024 digits, times and noise
    loss = evaluation_loss(teacher.network, load_digits(16)[0][:1024], proc, record["settings"]["t_min"])
    assert loss == pytest.approx(record["eval_loss_ema"], rel=1e-4)


@pytest.mark.parametrize("solver", ["lambda_ddim", "nvv", "csps_d", "rvv"])
def test_psld_samplers_run_on_the_network_teacher_in_float32_and_float64(solver):
    from dsno.builders import prior_state
    from dsno.solvers import solve, timesteps
    teacher = load_psld_unet_teacher()
    grid = timesteps(teacher.process, steps=4, spacing="time_quadratic", t_end=1e-3)
    noise = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out32 = solve(teacher, prior_state(teacher, noise), grid, solver=solver)
        out64 = solve(teacher, prior_state(teacher, noise.double()), grid, solver=solver)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64 and out32.shape == (3, 2, 16, 16)
    assert bool(torch.isfinite(out64).all())
    assert float((out32.double() - out64)[:, :1].abs().max()) < 1e-2 * max(1.0, float(out64[:, :1].abs().max()))
