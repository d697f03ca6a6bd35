"""Build the objects a run config describes: the teacher and the DSNO student."""

from __future__ import annotations

from typing import Any

import torch
from safetensors import SafetensorError

from dsno.config import ConfigError, RunConfig, SolverConfig, TeacherConfig
from dsno.nn import build_dsno
from dsno.nn.config import SamplerConfig
from dsno.nn.dsno import load_backbone_weights
from dsno.nn.parameterization import coefficients
from dsno.solvers import get as get_solver, timesteps
from dsno.teachers.base import Teacher, TeacherLoadError
from dsno.teachers.registry import get_teacher_kind


def build_teacher(tc: TeacherConfig) -> Teacher:
    """The teacher a teacher config describes, loaded by its kind (dsno.teachers.registry). A file
    that is missing, unreadable or of another kind is a TeacherLoadError naming it; so is a config
    value that differs from what the weights record (prediction, size, schedule), showing both."""
    path = getattr(tc, "path", None)
    where = f" from {path}" if path else ""
    try:
        teacher = get_teacher_kind(tc.kind).load(tc)
    except TeacherLoadError:
        raise
    except (ValueError, TypeError, OSError, KeyError, SafetensorError) as e:     # TypeError: a malformed record
        reason = " ".join(str(e).split()) or type(e).__name__
        raise TeacherLoadError(f"cannot load the teacher (teacher.kind={tc.kind}){where}: {reason}") from None
    expected = getattr(tc, "prediction", None)       # kinds whose weights record a prediction have the key
    if expected is not None and expected != teacher.prediction:
        raise TeacherLoadError(f"teacher.prediction={expected}, but the teacher (teacher.kind={tc.kind}){where} "
                               f"predicts {teacher.prediction}: set teacher.prediction={teacher.prediction}")
    return teacher


def state_shape(teacher: Teacher) -> tuple[int, ...]:
    """[C, H, W] of one solver state of this teacher: an image, or (augmented) data and momentum."""
    if teacher.state_shape is None:
        raise ValueError(f"{type(teacher).__name__} does not declare the shape of its solver state "
                         "(Teacher.state_shape)")
    return tuple(int(s) for s in teacher.state_shape)


def solver_grid(teacher: Teacher, sc: SolverConfig, times: list[float]) -> torch.Tensor:
    """The teacher solve's grid through every output time: float64 [N+1], strictly decreasing.

    The sc.steps steps are shared among the segments [T, t_1], [t_1, t_2], ..., [t_{M-1}, t_M] in
    proportion to their log-SNR length (at least one each), each segment spaced by sc.spacing,
    so the output times are grid points without creating the tiny steps that merging two grids
    would (multistep methods lose accuracy on abrupt step-size ratios)."""
    spec = get_solver(sc.name)
    if spec.grid is not None:                # a solver with its own grid (usf: its solver schedule's, checked to pass
        return torch.tensor(spec.grid(sc.solve_options()), dtype=torch.float64)    # through `times`)
    sched = teacher.grid_schedule
    if not sched.t_min - 1e-12 <= min(times) <= max(times) <= sched.T + 1e-12:
        raise ConfigError(f"config error: data.times={times}: the output times must lie in this teacher's time "
                          f"range [{sched.t_min:g}, {sched.T:g}]; pick data.times inside it")
    bounds = [sched.T, *times] if times[0] < sched.T else list(times)
    lam = sched.lam(torch.tensor(bounds, dtype=torch.float64))
    lengths = (lam[1:] - lam[:-1]).tolist()
    if sc.steps < len(lengths):
        raise ValueError(f"solver.steps={sc.steps} is fewer than the {len(lengths)} segments between output times")
    steps = [max(1, round(sc.steps * h / sum(lengths))) for h in lengths]
    pieces = [timesteps(sched, steps=n, spacing=sc.spacing, t_start=a, t_end=b)
              for n, a, b in zip(steps, bounds[:-1], bounds[1:])]
    return torch.cat([pieces[0]] + [p[1:] for p in pieces[1:]])


def output_indices(grid: torch.Tensor, times: list[float]) -> list[int]:
    idx = [int(torch.argmin((grid - t).abs())) for t in times]
    for t, i in zip(times, idx):
        if abs(float(grid[i]) - t) > 1e-9:
            raise ValueError(f"output time {t} is not on the solver grid")
    return idx


def prior_state(teacher: Teacher, noise: torch.Tensor) -> torch.Tensor:
    """The solver's start state for standard-normal `noise` [B, *state_shape]: the noise itself, or
    scaled per channel to an augmented prior (PSLD: m ~ N(0, M)). DSNO maps the same noise."""
    scale = teacher.prior_scale()
    return noise if scale is None else noise * scale.to(device=noise.device, dtype=noise.dtype)


def data_shape(teacher: Teacher) -> tuple[int, ...]:
    """[c, H, W] of one data sample: a state's first `data_channels` channels."""
    shape = state_shape(teacher)
    return (int(teacher.data_channels), *shape[1:])


def output_parameterization(rc: RunConfig, teacher: Teacher) -> dict[str, Any]:
    """The build config's output coefficients (skip, out_scale, in_scale, net_times) and their record.

    A student copied from the teacher reads its output as the teacher does (teacher.prediction);
    a fresh backbone predicts x0 ("denoised") or the state ("state")."""
    kind = rc.model.parameterization
    if teacher.augmented:        # no scalar schedule to read a skip from: the network emits the whole state
        m = len(rc.data.times)
        return {"skip": [0.0] * m, "out_scale": [1.0] * m, "in_scale": [1.0] * m,
                "net_times": [float(t) for t in rc.data.times], "parameterization": {"kind": kind, "skip": "none"}}
    prediction = teacher.prediction if rc.model.backbone.type == "teacher" else "x0"
    coef = coefficients(teacher.schedule, [float(t) for t in rc.data.times], kind, prediction,
                        rc.model.sigma_data, rc.model.denoise_time)
    record = {"kind": kind, "sigma_data": rc.model.sigma_data}
    if kind == "denoised":
        record.update(prediction=prediction, denoise_time=rc.model.denoise_time)
    return {**coef, "parameterization": record}


def student_config(rc: RunConfig, teacher: Teacher, shape: tuple[int, ...]) -> SamplerConfig:
    """The build config of the DSNO student (see dsno.nn.build_dsno), checked on construction."""
    bb = rc.model.backbone
    num_classes = getattr(teacher, "num_classes", None)       # a conditional student takes the teacher's labels
    if bb.type == "teacher":        # a copied network keeps its class embedding
        backbone = teacher_backbone_config(teacher)
        time_input = teacher.time_input_spec
    else:        # a fresh backbone of an augmented process emits only the data part of each state
        backbone = {"type": "unet", "kwargs": {
            "in_channels": shape[0], "out_channels": int(teacher.data_channels), "image_size": shape[-1],
            "base_channels": bb.base_channels, "channel_mult": list(bb.channel_mult),
            "num_res_blocks": bb.num_res_blocks, "attn_resolutions": list(bb.attn_resolutions),
            "dropout": bb.dropout}}
        if num_classes is not None:     # a fresh backbone gets a class embedding
            backbone["kwargs"]["num_classes"] = num_classes
        time_input = "continuous"
    records = ({"process": teacher.process.to_dict(), "data_channels": teacher.data_channels} if teacher.augmented
               else {"schedule": teacher.schedule.to_dict()})
    return SamplerConfig(backbone=backbone, time_input=time_input, times=tuple(float(t) for t in rc.data.times),
                         modes=rc.model.modes, **output_parameterization(rc, teacher), state_shape=tuple(shape),
                         experiment=rc.experiment, num_classes=num_classes, **records)


def teacher_backbone_config(teacher: Teacher) -> dict[str, Any]:
    cfg = teacher.backbone_config
    if cfg is None:
        raise ValueError(f"model.backbone.type=teacher copies the teacher's network into the student, and "
                         f"{type(teacher).__name__} has none a DSNO build config can carry (exact teachers have no "
                         "network; EDM and flow diffusers teachers wrap theirs in a preconditioning): use "
                         "model.backbone.type=unet")
    return cfg


def build_student(rc: RunConfig, teacher: Teacher, shape: tuple[int, ...]):
    """(DSNO module, its build config as the JSON dict dsno_config.json holds). With backbone.type=teacher
    the student starts from the teacher's weights (every non-temporal layer copied)."""
    config = student_config(rc, teacher, shape)
    model = build_dsno(config)
    if rc.model.backbone.type == "teacher":
        load_backbone_weights(model, teacher.network)
    return model, config.to_dict()
