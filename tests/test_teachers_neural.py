"""Neural teachers: the project's UNet teacher (training recipe, file format, shipped asset) and
diffusers UNet2DModel teachers loaded from local folders; DSNO students start equal to them."""

from __future__ import annotations

import json
import math
import socket

import diffusers
import numpy as np
import pytest
import torch

from dsno.nn.dsno import (DiffusersUNet, DiscreteTime, build_backbone, build_dsno, load_backbone_weights,
                          student_from_teacher)
from dsno.schedules import VPSchedule
from dsno.teachers.diffusers import (DiffusersTeacher, load_diffusers_teacher, scheduler_betas,
                                     scheduler_prediction)
from dsno.teachers.train_unet import (TrainSettings, dsm_loss, evaluation_loss, main, make_record,
                                      save_teacher, stratified_times, train)
from dsno.teachers.unet import UNetTeacher, asset_path, load_unet_teacher, read_record


TINY_UNET = dict(in_channels=1, out_channels=1, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                 attn_resolutions=[4], image_size=8)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with noise (the UNet zero-initialises its output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture
def unet_teacher() -> UNetTeacher:
    teacher = UNetTeacher(TINY_UNET)
    randomize(teacher.network)
    return teacher.eval()


def tiny_settings(**kw) -> TrainSettings:
    base = dict(size=8, steps=3, batch_size=8, base_channels=8, channel_mult=[1, 2], attn_resolutions=[4],
                warmup_steps=1)
    return TrainSettings(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
# own UNet teacher


def test_unet_teacher_calls_its_network_at_continuous_time(unet_teacher):
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.9, 0.3, 0.01], dtype=torch.float64)
    with torch.no_grad():
        direct = unet_teacher.network(x, t.float())
        eps = unet_teacher.eps(x, t)
        x0 = unet_teacher.x0(x, t)
        eps64 = unet_teacher.eps(x.double(), t)
    assert direct.abs().mean() > 1e-2
    torch.testing.assert_close(eps, direct, rtol=0, atol=0)
    a, s = unet_teacher.schedule.alpha(t).float(), unet_teacher.schedule.sigma(t).float()
    torch.testing.assert_close(x0, (x - s[:, None, None, None] * direct) / a[:, None, None, None])
    assert eps64.dtype == torch.float64
    torch.testing.assert_close(eps64, direct.double(), rtol=1e-6, atol=1e-6)
    assert unet_teacher.prediction == "eps" and unet_teacher.time_input_spec == "continuous"
    assert unet_teacher.shape == (1, 8, 8)
    assert unet_teacher.schedule == VPSchedule.linear()


def test_unet_teacher_backbone_config_rebuilds_the_same_network(unet_teacher):
    cfg = unet_teacher.backbone_config
    assert cfg["type"] == "unet" and cfg["kwargs"]["base_channels"] == 8 and cfg["kwargs"]["time_scale"] == 1000.0
    assert json.loads(json.dumps(cfg)) == cfg
    rebuilt = build_backbone(cfg)
    rebuilt.load_state_dict(unet_teacher.network.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.05])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t), unet_teacher.network(x, t), rtol=0, atol=0)


def test_unet_teacher_fingerprint_tracks_the_weights(unet_teacher):
    fp = unet_teacher.fingerprint()
    assert fp["class"] == "UNetTeacher" and fp["prediction"] == "eps" and fp["shape"] == [1, 8, 8]
    assert fp == unet_teacher.fingerprint()
    with torch.no_grad():
        unet_teacher.network.conv_out.bias[0] += 1e-3
    assert unet_teacher.fingerprint()["weights_sha256"] != fp["weights_sha256"]


def test_unet_teacher_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown UNet arguments \\['widht'\\]"):
        UNetTeacher({**TINY_UNET, "widht": 3})
    with pytest.raises(ValueError, match="out_channels=2"):
        UNetTeacher({**TINY_UNET, "out_channels": 2})
    with pytest.raises(ValueError, match="prediction must be one of"):
        UNetTeacher(TINY_UNET, prediction="score")


# ---------------------------------------------------------------------------------------------
# training recipe


def test_stratified_times_put_one_draw_in_each_slice():
    t = stratified_times(64, 1e-3, 1.0, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.shape == (64,)
    slot = torch.floor((t - 1e-3) / (1.0 - 1e-3) * 64).long()
    assert sorted(slot.tolist()) == list(range(64))
    assert not torch.equal(slot, torch.arange(64))  # shuffled


def test_dsm_loss_is_zero_for_the_exact_denoiser_of_a_point_mass():
    schedule = VPSchedule.linear()
    c = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    x0 = c.expand(5, 1, 4, 4)

    def oracle(x_t, t):  # data is the single point c: eps = (x_t - alpha c) / sigma
        a = schedule.alpha(t).float().reshape(-1, 1, 1, 1)
        s = schedule.sigma(t).float().reshape(-1, 1, 1, 1)
        return (x_t - a * c) / s

    t = stratified_times(5, 1e-3, 1.0, torch.Generator().manual_seed(1))
    noise = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    assert float(dsm_loss(oracle, x0, t, noise, schedule)) < 1e-9
    assert float(dsm_loss(lambda x, t: torch.zeros_like(x), x0, t, noise, schedule)) == pytest.approx(
        float(noise.pow(2).mean()), rel=1e-6)


def test_training_lowers_the_denoising_loss():
    from dsno.digits import load_digits
    images = load_digits(8)[0][:256]
    settings = tiny_settings(steps=30, batch_size=16, lr=3e-3, ema_decay=0.0)
    schedule = VPSchedule.from_dict(settings.schedule)
    untrained = UNetTeacher(settings.network_kwargs()).network  # zero output layer: loss = E[eps^2] ~ 1
    before = evaluation_loss(untrained, images, schedule, settings.t_min)
    lines: list[str] = []
    network, summary = train(settings, images, log=lines.append, log_every=10)
    after = evaluation_loss(network, images, schedule, settings.t_min)
    assert before == pytest.approx(1.0, abs=0.05)
    assert after < 0.6 * before
    assert summary["eval_loss_ema"] == pytest.approx(after, rel=1e-6)  # images[:1024] == images here
    assert len(lines) == 3 and lines[-1].startswith("step     30/30  loss")
    assert not network.training and next(network.parameters()).device.type == "cpu"


def test_cli_writes_weights_and_record_that_load_back(tmp_path, capsys):
    out = tmp_path / "teacher.safetensors"
    args = ["--size", "8", "--steps", "2", "--batch-size", "4", "--base-channels", "8", "--channel-mult", "1", "2",
            "--attn-resolutions", "4", "--warmup-steps", "1", "--log-every", "1", "--device", "cpu", "--out", str(out)]
    main(args)
    printed = capsys.readouterr().out
    assert "step      2/2  loss" in printed and f"wrote {out}" in printed
    record = read_record(out)
    assert json.loads(out.with_suffix(".json").read_text()) == record
    assert record["command"] == "python -m dsno.teachers.train_unet " + " ".join(args[:-2])  # --out left out
    assert record["settings"]["steps"] == 2 and record["backbone"]["kwargs"]["image_size"] == 8
    assert math.isfinite(record["final_train_loss"]) and math.isfinite(record["eval_loss_ema"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.json", "teacher.safetensors"]  # no temp files
    teacher = load_unet_teacher(out, size=8)
    assert teacher.backbone_config == record["backbone"] and not teacher.training


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["--steps", "0", "--out", str(tmp_path / "a.safetensors")])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "a.pt")])


# ---------------------------------------------------------------------------------------------
# the weights file


def test_save_and_load_round_trip(tmp_path, unet_teacher):
    settings = tiny_settings()
    path = tmp_path / "t.safetensors"
    save_teacher(path, unet_teacher.network, make_record(settings, {"final_train_loss": 0.5}, "cmd"))
    loaded = load_unet_teacher(path, size=8)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1.0, 0.5, 0.1, 1e-3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eps(x, t), unet_teacher.eps(x, t), rtol=0, atol=0)
    assert loaded.fingerprint()["weights_sha256"] == unet_teacher.fingerprint()["weights_sha256"]
    assert loaded.fingerprint()["name"] == "mnist_unet8"

    with pytest.raises(ValueError, match="trained with VPSchedule.linear.*cannot be used with VPSchedule.cosine"):
        load_unet_teacher(path, schedule=VPSchedule.cosine(), size=8)
    with pytest.raises(ValueError, match="8x8 images, but size=16"):
        load_unet_teacher(path, size=16)
    assert load_unet_teacher(path, schedule=VPSchedule.linear(), size=8).schedule == VPSchedule.linear()


def test_load_errors_say_what_to_do(tmp_path):
    from safetensors.torch import save_file
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=f"{missing} not found; make them with: python -m "
                                                 f"dsno.teachers.train_unet --size 16 .* --out {missing}"):
        load_unet_teacher(missing)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(ValueError, match="no 'dsno_teacher' metadata"):
        load_unet_teacher(bare)
    wrong = tmp_path / "wrong.safetensors"
    save_teacher(wrong, UNetTeacher({**TINY_UNET, "base_channels": 16}).network, make_record(tiny_settings(), {}, "c"))
    with pytest.raises(ValueError, match="weights do not fit UNet"):
        load_unet_teacher(wrong, size=8)


def test_shipped_teacher_matches_its_record():
    path = asset_path(16)
    record = read_record(path)
    assert json.loads(path.with_suffix(".json").read_text()) == record
    assert record["command"].startswith("python -m dsno.teachers.train_unet --size 16")
    assert path.stat().st_size < 8e6
    teacher = load_unet_teacher()
    assert teacher.shape == (1, 16, 16) and teacher.schedule == VPSchedule.from_dict(record["schedule"])
    from dsno.digits import load_digits
    images = load_digits(16)[0][:1024]
    loss = evaluation_loss(teacher.network, images, teacher.schedule, record["settings"]["t_min"])
    assert loss == pytest.approx(record["eval_loss_ema"], rel=1e-4)
    assert loss < 0.1  # a trained denoiser: an untrained one scores about 1


def test_float64_solve_of_a_float32_network_matches_the_all_float64_solve():
    """Eval's reference solves a network teacher in float64 with the network left in float32: its
    rounding must stay far below the reference's own step error (60 against 240 steps: about 7e-3)."""
    from dsno.solvers import solve, timesteps
    teacher = load_unet_teacher()
    x_T = torch.randn(4, *teacher.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = timesteps(teacher.schedule, steps=20, spacing="logsnr", t_end=1e-3)
    with torch.no_grad():
        mixed = solve(teacher, x_T, grid, solver="dpm_solver_pp", order=3)
        teacher.double()
        full = solve(teacher, x_T, grid, solver="dpm_solver_pp", order=3)
    assert mixed.dtype == full.dtype == torch.float64
    gap = float((mixed - full).square().mean().sqrt())
    assert 0 < gap < 1e-5


# ---------------------------------------------------------------------------------------------
# diffusers UNet2DModel teachers

NUM_STEPS = 40


def tiny_unet2d(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
               norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return diffusers.UNet2DModel(**{**cfg, **overrides}).eval()


def write_folder(root, unet=None, layout: str = "ddpm", safe: bool = True, **scheduler_kw):
    """Save a UNet2DModel + DDPMScheduler into `root` in the DDPM (subfolders) or flat layout."""
    unet = unet if unet is not None else tiny_unet2d()
    scheduler = diffusers.DDPMScheduler(**{"num_train_timesteps": NUM_STEPS, **scheduler_kw})
    unet.save_pretrained(root / "unet" if layout == "ddpm" else root, safe_serialization=safe)
    scheduler.save_pretrained(root / "scheduler" if layout == "ddpm" else root)
    return unet, scheduler


@pytest.mark.parametrize("layout", ["ddpm", "flat"])
def test_diffusers_teacher_calls_the_unet_at_the_step_index(tmp_path, layout):
    unet, _ = write_folder(tmp_path, layout=layout)
    teacher = load_diffusers_teacher(tmp_path)
    assert isinstance(teacher, DiffusersTeacher) and not teacher.training
    assert teacher.prediction == "eps" and teacher.time_input_spec == {"discrete": NUM_STEPS}
    assert teacher.shape == (3, 8, 8) and teacher.schedule.num_steps == NUM_STEPS
    steps = torch.tensor([0, 7, 19, NUM_STEPS - 1])
    x = torch.randn(4, 3, 8, 8)
    t = (steps.double() + 1) / NUM_STEPS
    with torch.no_grad():
        direct = unet(x, steps).sample
        eps = teacher.eps(x, t)
        eps64 = teacher.eps(x.double(), t)
    assert direct.abs().mean() > 1e-2
    torch.testing.assert_close(eps, direct, rtol=0, atol=0)
    torch.testing.assert_close(eps64, direct.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_diffusers_schedule_matches_alphas_cumprod(tmp_path, beta_schedule):
    kw = dict(beta_schedule=beta_schedule, num_train_timesteps=1000)
    if beta_schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    _, scheduler = write_folder(tmp_path, **kw)
    teacher = load_diffusers_teacher(tmp_path)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    alpha_bar = teacher.schedule.alpha(t) ** 2
    ref = scheduler.alphas_cumprod.double()  # diffusers works in float32; dsno in float64
    torch.testing.assert_close(alpha_bar, ref, rtol=2e-5, atol=1e-9)
    assert teacher.time_input_spec == {"discrete": 1000}


def test_scheduler_defaults_and_trained_betas_follow_diffusers():
    ref = diffusers.DDPMScheduler().betas.double()
    torch.testing.assert_close(torch.from_numpy(scheduler_betas({})), ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(scheduler_betas({"trained_betas": [0.1, 0.2, 0.3]}), [0.1, 0.2, 0.3])
    assert scheduler_prediction({}) == "eps"


@pytest.mark.parametrize("prediction_type, kind", [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")])
def test_diffusers_prediction_types_map(tmp_path, prediction_type, kind):
    unet, _ = write_folder(tmp_path, prediction_type=prediction_type)
    teacher = load_diffusers_teacher(tmp_path)
    assert teacher.prediction == kind
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 0.1], dtype=torch.float64)
    with torch.no_grad():
        raw = unet(x, t * NUM_STEPS - 1).sample
        x0 = teacher.x0(x, t)
    a = teacher.schedule.alpha(t).float().reshape(-1, 1, 1, 1)
    s = teacher.schedule.sigma(t).float().reshape(-1, 1, 1, 1)
    expected = {"eps": (x - s * raw) / a, "x0": raw, "v": a * x - s * raw}[kind]
    torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)


def test_diffusers_backbone_config_and_fingerprint(tmp_path):
    write_folder(tmp_path)
    teacher = load_diffusers_teacher(tmp_path)
    cfg = teacher.backbone_config
    assert cfg["type"] == "diffusers_unet2d" and list(cfg["config"]["block_out_channels"]) == [32, 32]
    assert not any(k.startswith("_") for k in cfg["config"])
    rebuilt = build_backbone(json.loads(json.dumps(cfg)))
    rebuilt.unet.load_state_dict(teacher.network.state_dict())
    x, steps = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 30.0])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, steps), teacher.network(x, steps).sample, rtol=0, atol=1e-5)
    fp = teacher.fingerprint()
    assert fp == load_diffusers_teacher(tmp_path).fingerprint()
    assert fp["schedule"]["num_steps"] == NUM_STEPS and fp["time_input"] == {"discrete": NUM_STEPS}
    with torch.no_grad():
        teacher.network.conv_out.bias[0] += 1e-3
    assert teacher.fingerprint()["weights_sha256"] != fp["weights_sha256"]


def test_diffusers_loads_offline(tmp_path, monkeypatch):
    write_folder(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert load_diffusers_teacher(tmp_path).schedule.num_steps == NUM_STEPS


class NotATensor:
    pass


def test_diffusers_bin_weights_load_only_through_weights_only(tmp_path):
    unet, _ = write_folder(tmp_path / "ok", safe=False)
    assert (tmp_path / "ok" / "unet" / "diffusion_pytorch_model.bin").is_file()
    teacher = load_diffusers_teacher(tmp_path / "ok")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher.eps(x, 0.5), unet(x, torch.tensor([NUM_STEPS / 2 - 1])).sample)
    write_folder(tmp_path / "pickle", safe=False)
    torch.save({"payload": NotATensor()}, tmp_path / "pickle" / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_diffusers_teacher(tmp_path / "pickle")


def test_diffusers_missing_or_malformed_folders_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)does not exist.*unet/config.json.*scheduler/scheduler_config.json"
                       ) as e:
        load_diffusers_teacher(tmp_path / "absent")
    assert "diffusion_pytorch_model.safetensors" in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing; looked for") as e:
        load_diffusers_teacher(empty)
    assert str(empty / "unet" / "config.json") in str(e.value) and str(empty / "config.json") in str(e.value)

    no_sched = tmp_path / "no_sched"
    write_folder(no_sched)
    (no_sched / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="scheduler config is missing") as e:
        load_diffusers_teacher(no_sched)
    assert str(no_sched / "scheduler" / "scheduler_config.json") in str(e.value)

    no_weights = tmp_path / "no_weights"
    write_folder(no_weights)
    (no_weights / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="(?s)weights is missing.*diffusion_pytorch_model.bin"):
        load_diffusers_teacher(no_weights)

    broken = tmp_path / "broken"
    write_folder(broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_diffusers_teacher(broken)


@pytest.mark.parametrize("scheduler_kw, message", [
    ({"prediction_type": "score"}, "prediction_type 'score' is not supported; use one of \\['epsilon', 'sample', "
                                   "'v_prediction'\\]"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid' is not supported"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_diffusers_bad_scheduler_configs(tmp_path, scheduler_kw, message):
    write_folder(tmp_path)
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler_kw}))
    with pytest.raises(ValueError, match=message):
        load_diffusers_teacher(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"block_out_channels": [16, 16]}, "could not load the UNet2DModel from .*size mismatch"),
    ({"layers_per_block": 2}, "does not fit .*config.json: \\d+ missing keys \\(e.g. "),  # no silent random init
])
def test_diffusers_weights_that_do_not_fit_the_config(tmp_path, change, message):
    write_folder(tmp_path)
    path = tmp_path / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=f"(?s){message}"):
        load_diffusers_teacher(tmp_path)


def test_diffusers_unsupported_unets(tmp_path):
    write_folder(tmp_path, unet=tiny_unet2d(out_channels=6))
    with pytest.raises(ValueError, match="in_channels=3 but out_channels=6"):
        load_diffusers_teacher(tmp_path)


# ---------------------------------------------------------------------------------------------
# DSNO students start equal to their teacher


def test_student_of_the_unet_teacher_starts_equal_to_it(unet_teacher):
    times = [0.9, 0.5, 0.1, 1e-3]
    student = student_from_teacher(unet_teacher.network, times, modes=2).eval()
    x_T = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = student(x_T)
        assert out.shape == (3, 4, 1, 8, 8)
        for m, t in enumerate(times):
            ref = unet_teacher.network(x_T, torch.full((3,), t))
            assert ref.abs().mean() > 1e-2
            torch.testing.assert_close(out[:, m], ref, rtol=0, atol=1e-5)


def test_student_of_the_diffusers_teacher_starts_equal_to_it(tmp_path):
    write_folder(tmp_path)
    teacher = load_diffusers_teacher(tmp_path)
    times = [1.0, 0.6, 0.3, 0.025]
    n = teacher.time_input_spec["discrete"]
    student = student_from_teacher(DiffusersUNet(teacher.network), times, modes=2, time_input=DiscreteTime(n)).eval()
    x_T = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = student(x_T)
        for m, t in enumerate(times):
            ref = teacher.network(x_T, torch.full((2,), t * n - 1)).sample
            torch.testing.assert_close(out[:, m], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "diffusers"])
def test_build_dsno_from_the_teachers_config_and_weights_starts_equal_to_it(tmp_path, unet_teacher, kind):
    if kind == "unet":
        teacher = unet_teacher
    else:
        write_folder(tmp_path)
        teacher = load_diffusers_teacher(tmp_path)
    times = [1.0, 0.5, 0.25, 0.025]
    config = {"format_version": 2, "backbone": teacher.backbone_config, "time_input": teacher.time_input_spec,
              "times": times, "modes": 2, "state_shape": list(teacher.shape), "schedule": teacher.schedule.to_dict()}
    model = build_dsno(json.loads(json.dumps(config))).eval()
    load_backbone_weights(model, teacher.network)
    x_T = torch.randn(2, *teacher.shape)
    with torch.no_grad():
        out = model(x_T)
        for m, t in enumerate(times):
            tm = torch.full((2,), t)
            if kind == "unet":
                ref = teacher.network(x_T, tm)
            else:
                ref = teacher.network(x_T, tm * teacher.time_input_spec["discrete"] - 1).sample
            torch.testing.assert_close(out[:, m], ref, rtol=0, atol=1e-5)
