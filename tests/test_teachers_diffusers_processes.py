"""diffusers folders beyond VP: the scheduler config's `_class_name` picks the process.

Oracles are diffusers' own schedulers, on tiny random UNet2DModels written to tmp folders:
- EDM (EDMEulerScheduler, EDMDPMSolverMultistepScheduler): our x0 equals `precondition_outputs` of
  the UNet run on `precondition_inputs` at `precondition_noise`; one scheduler step equals our DDIM
  step between the same two sigmas;
- flow matching (FlowMatchEulerDiscreteScheduler, and DPM-Solver++ with use_flow_sigmas): the UNet
  is called at t * N; one scheduler step equals our DDIM step;
- unknown classes and configs a process cannot represent are refused, naming them.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from dsno.builders import build_teacher
from dsno.schedules import FlowSchedule, VESchedule
from dsno.solvers import solve, timesteps
from dsno.teachers.base import TeacherLoadError
from dsno.teachers.diffusers import (DiffusersEDMTeacher, DiffusersFlowTeacher, DiffusersTeacher,
                                     DiffusersTeacherConfig, EDMPreconditioning, load_diffusers_teacher)
from test_teachers_neural import tiny_unet2d


def write(root, scheduler, unet=None):
    """Save a tiny UNet2DModel and `scheduler` in the DDPM layout; returns the UNet."""
    unet = unet if unet is not None else tiny_unet2d()
    unet.save_pretrained(root / "unet")
    scheduler.save_pretrained(root / "scheduler")
    return unet


def edit_scheduler(root, **changes):
    path = root / "scheduler" / "scheduler_config.json"
    cfg = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def x_batch(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# --- EDM -----------------------------------------------------------------------------------------

EDM_KW = dict(sigma_min=0.01, sigma_max=20.0, sigma_data=0.7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_denoiser_is_diffusers_preconditioning(tmp_path, prediction_type):
    scheduler = diffusers.EDMEulerScheduler(**EDM_KW, prediction_type=prediction_type)
    unet = write(tmp_path, scheduler)
    teacher = load_diffusers_teacher(tmp_path)
    assert isinstance(teacher, DiffusersEDMTeacher) and not teacher.training
    assert teacher.schedule == VESchedule(0.01, 20.0) and teacher.prediction == "x0"
    assert teacher.preconditioning == EDMPreconditioning(0.7, prediction_type)
    for sigma in (0.02, 0.5, 1.0, 7.0, 19.0):
        x = x_batch(1, scale=(sigma**2 + 0.49) ** 0.5)
        s = torch.tensor(sigma, dtype=torch.float32)
        with torch.no_grad():
            f = unet(scheduler.precondition_inputs(x, s), scheduler.precondition_noise(s)).sample
            ref = scheduler.precondition_outputs(x, f, s)
            x0 = teacher.x0(x, sigma)
            eps = teacher.eps(x, sigma)
        assert f.abs().mean() > 1e-2
        torch.testing.assert_close(x0, ref, rtol=1e-5, atol=1e-5 * sigma)
        torch.testing.assert_close(eps, (x - ref) / sigma, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_edm_scheduler_step_equals_our_ddim_step(tmp_path, cls):
    scheduler = getattr(diffusers, cls)(**EDM_KW)
    unet = write(tmp_path, scheduler)
    teacher = load_diffusers_teacher(tmp_path)
    scheduler.set_timesteps(8)
    i = 3
    t, s0, s1 = scheduler.timesteps[i], scheduler.sigmas[i], scheduler.sigmas[i + 1]
    x = x_batch(2, scale=float(s0))
    with torch.no_grad():
        scheduler.set_begin_index(i)
        out = unet(scheduler.scale_model_input(x, t), t).sample
        ref = scheduler.step(out, t, x).prev_sample
        ours = solve(teacher, x, torch.tensor([float(s0), float(s1)], dtype=torch.float64), solver="ddim")
    assert float((ref - x).abs().mean()) > 1e-2 * float(s0)    # the step moves
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(s0))


def test_edm_defaults_and_refusals(tmp_path):
    write(tmp_path, diffusers.EDMEulerScheduler())
    edit_scheduler(tmp_path, sigma_min=None, sigma_max=None, sigma_data=None, prediction_type=None)
    teacher = load_diffusers_teacher(tmp_path)
    assert teacher.schedule == VESchedule(0.002, 80.0) and teacher.preconditioning == EDMPreconditioning(0.5, "epsilon")

    edit_scheduler(tmp_path, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported by diffusers' EDM preconditioning"):
        load_diffusers_teacher(tmp_path)
    edit_scheduler(tmp_path, prediction_type="epsilon", sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma_data must be a finite number > 0, got 0.0"):
        load_diffusers_teacher(tmp_path)
    edit_scheduler(tmp_path, sigma_data=0.5, sigma_min=90.0)
    with pytest.raises(ValueError, match="VESchedule needs sigma_min < sigma_max"):
        load_diffusers_teacher(tmp_path)


# --- flow matching -------------------------------------------------------------------------------

def test_flow_teacher_calls_the_unet_at_t_times_n(tmp_path):
    unet = write(tmp_path, diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=500, shift=3.0))
    teacher = load_diffusers_teacher(tmp_path)
    assert isinstance(teacher, DiffusersFlowTeacher) and teacher.schedule == FlowSchedule()
    assert teacher.prediction == "flow_velocity" and teacher.time_input_spec == {"flow": 500}
    x, t = x_batch(3), torch.tensor([0.9, 0.25], dtype=torch.float64)
    with torch.no_grad():
        u = unet(x, (t * 500).float()).sample
        ours = teacher.flow_velocity(x, t)
        x0 = teacher.x0(x, t)
    assert u.abs().mean() > 1e-2
    torch.testing.assert_close(ours, u, rtol=0, atol=0)
    torch.testing.assert_close(x0, x - t.float().reshape(-1, 1, 1, 1) * u, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    lambda: diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                  flow_shift=2.0),
], ids=["flow_match_euler", "dpm_solver_flow_sigmas"])
def test_flow_scheduler_step_equals_our_ddim_step(tmp_path, make):
    scheduler = make()
    unet = write(tmp_path, scheduler)
    teacher = load_diffusers_teacher(tmp_path)
    assert isinstance(teacher, DiffusersFlowTeacher) and teacher.prediction == "flow_velocity"
    scheduler.set_timesteps(8)
    i = 2
    t, s0, s1 = scheduler.timesteps[i], float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
    x = x_batch(4)
    # the multistep schedulers keep int64 timesteps (sigma * N rounded down) for the model call; the
    # model is defined at sigma * N, where FlowMatchEulerDiscreteScheduler calls it and dsno does
    assert int(t) == int(s0 * 1000)
    with torch.no_grad():
        scheduler.set_begin_index(i)
        out = unet(x, torch.tensor(s0 * 1000, dtype=torch.float32)).sample
        ref = scheduler.step(out, t, x).prev_sample
        ours = solve(teacher, x, torch.tensor([s0, s1], dtype=torch.float64), solver="ddim")
    assert 0 < s1 < s0 < 1 and float((ref - x).abs().mean()) > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_flow_heun_loads_as_flow_and_bad_flow_configs_are_refused(tmp_path):
    write(tmp_path, diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=200))
    teacher = load_diffusers_teacher(tmp_path)
    assert isinstance(teacher, DiffusersFlowTeacher) and teacher.num_train_timesteps == 200
    edit_scheduler(tmp_path, _class_name="FlowMatchEulerDiscreteScheduler", invert_sigmas=True)
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        load_diffusers_teacher(tmp_path)

    vp = tmp_path / "vp"
    write(vp, diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction"))
    with pytest.raises(ValueError, match="'flow_prediction' needs use_flow_sigmas=True"):
        load_diffusers_teacher(vp)
    edit_scheduler(vp, use_flow_sigmas=True, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="'v_prediction' is not supported with use_flow_sigmas=True"):
        load_diffusers_teacher(vp)
    edit_scheduler(vp, prediction_type="epsilon")
    assert load_diffusers_teacher(vp).prediction == "eps"
    edit_scheduler(vp, _class_name="EulerDiscreteScheduler")
    with pytest.raises(ValueError, match="EulerDiscreteScheduler has no use_flow_sigmas"):
        load_diffusers_teacher(vp)


# --- dispatch, refusals, fingerprints, end to end ------------------------------------------------

def test_vp_family_and_no_class_name_stay_vp(tmp_path):
    write(tmp_path, diffusers.EulerDiscreteScheduler(num_train_timesteps=40, prediction_type="v_prediction"))
    teacher = load_diffusers_teacher(tmp_path)
    assert type(teacher) is DiffusersTeacher and teacher.prediction == "v" and teacher.schedule.num_steps == 40
    edit_scheduler(tmp_path, _class_name=None)
    assert type(load_diffusers_teacher(tmp_path)) is DiffusersTeacher
    edit_scheduler(tmp_path, _class_name="EulerDiscreteScheduler", timestep_type="continuous")
    with pytest.raises(ValueError, match="timestep_type='continuous' calls the model with 0.25 log sigma"):
        load_diffusers_teacher(tmp_path)


def test_unknown_scheduler_class_is_refused_by_name_in_one_line(tmp_path):
    write(tmp_path, diffusers.ScoreSdeVeScheduler())
    with pytest.raises(ValueError, match="scheduler_config.json: scheduler class 'ScoreSdeVeScheduler' is not "
                                         "supported; dsno loads EDM \\(EDMEulerScheduler, EDMDPMSolverMultistep"
                                         "Scheduler\\), flow matching \\(FlowMatchEulerDiscreteScheduler, "):
        load_diffusers_teacher(tmp_path)
    with pytest.raises(TeacherLoadError) as e:
        build_teacher(DiffusersTeacherConfig(path=str(tmp_path)))
    message = str(e.value)
    assert "\n" not in message and "'ScoreSdeVeScheduler' is not supported" in message
    assert "DDPMScheduler" in message and "DPMSolverMultistepScheduler" in message


def test_config_prediction_is_checked_against_the_folder(tmp_path):
    write(tmp_path, diffusers.FlowMatchEulerDiscreteScheduler())
    assert build_teacher(DiffusersTeacherConfig(path=str(tmp_path), prediction="flow_velocity")).prediction == \
        "flow_velocity"
    with pytest.raises(TeacherLoadError, match="teacher.prediction=eps, but .* predicts flow_velocity"):
        build_teacher(DiffusersTeacherConfig(path=str(tmp_path), prediction="eps"))


def test_fingerprints_tell_the_processes_apart(tmp_path):
    unet = tiny_unet2d()
    folders = {
        "vp": diffusers.DDPMScheduler(num_train_timesteps=1000),
        "edm": diffusers.EDMEulerScheduler(),
        "edm_sd": diffusers.EDMEulerScheduler(sigma_data=0.6),
        "edm_v": diffusers.EDMEulerScheduler(prediction_type="v_prediction"),
        "flow": diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
        "flow_n": diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=500),
        "flow_shift": diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    }
    fps = {}
    for name, scheduler in folders.items():
        write(tmp_path / name, scheduler, unet)
        fps[name] = json.loads(json.dumps(load_diffusers_teacher(tmp_path / name).fingerprint()))
    for fp in fps.values():
        assert fp["weights_sha256"] == fps["vp"]["weights_sha256"]
    assert fps["flow_shift"] == {**fps["flow"], "name": "flow_shift"}   # shift moves sampling grids only
    distinct = [json.dumps({k: v for k, v in fp.items() if k != "name"}, sort_keys=True)
                for n, fp in fps.items() if n != "flow_shift"]
    assert len(set(distinct)) == len(distinct)
    assert [fps[n]["schedule"]["kind"] for n in ("vp", "edm", "flow")] == ["discrete", "ve", "flow"]
    assert fps["edm"]["class"] == "DiffusersEDMTeacher" and fps["flow"]["class"] == "DiffusersFlowTeacher"
    assert fps["edm_sd"]["time_input"] == {"edm": {"sigma_data": 0.6, "prediction_type": "epsilon"}}
    assert fps["flow_n"]["time_input"] == {"flow": 500}


@pytest.mark.parametrize("scheduler", ["edm", "flow"])
@pytest.mark.parametrize("solver, order", [("ddim", None), ("dpm_solver_pp", 2)])
def test_solvers_run_end_to_end_on_edm_and_flow_teachers(tmp_path, scheduler, solver, order):
    make = {"edm": lambda: diffusers.EDMEulerScheduler(sigma_max=10.0),
            "flow": diffusers.FlowMatchEulerDiscreteScheduler}[scheduler]
    write(tmp_path, make())
    teacher = load_diffusers_teacher(tmp_path)
    assert teacher.backbone_config is None and teacher.network is not None   # no DSNO copy of its network
    grid = timesteps(teacher.schedule, steps=4)
    x_T = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(5)) * float(
        (teacher.schedule.alpha(grid[0]) ** 2 * 0.25 + teacher.schedule.sigma(grid[0]) ** 2).sqrt())
    with torch.no_grad():
        traj = solve(teacher, x_T, grid, solver=solver, order=order, return_trajectory=True)
    assert traj.shape == (5, 2, 3, 8, 8) and torch.isfinite(traj).all()
    assert float((traj[-1] - traj[0]).abs().mean()) > 1e-3
