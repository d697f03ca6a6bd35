"""The teacher stage: solve the teacher's ODE from noise and store the states at the output times."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from dsno.builders import output_indices, prior_state, solver_grid
from dsno.checks import fail
from dsno.config import RunConfig, SolverConfig
from dsno.data import generate_dataset
from dsno.data.generate import LABELS, label_rule
from dsno.solvers import get as get_solver, solve
from dsno.teachers.base import Teacher
from dsno.teachers.conditional import teacher_class_weights


def solver_spec(sc: SolverConfig) -> dict[str, Any]:
    """The teacher solve's part of the data set's fingerprint, with the solver's own entries (usf: its
    solver schedule's hash)."""
    spec = {"name": sc.name, "order": sc.order, "steps": sc.steps, "spacing": sc.spacing,
            "t_end": sc.t_end, "options": dict(sc.options)}
    solver = get_solver(sc.name)
    if solver.fingerprint is not None:
        spec.update(solver.fingerprint(sc.solve_options()))
    return spec


def make_solve(teacher: Teacher, sc: SolverConfig, grid: torch.Tensor, times: list[float],
               device: torch.device | str = "cpu", precision: str = "fp32", compile: bool = False,
               channels_last: bool = False) -> Callable[..., torch.Tensor]:
    """solve(x_T: [b, C, H, W], labels: [b] long or None) -> states [b, M, C, H, W] float32 at the
    output times; labels: the class of each trajectory for a conditional teacher (its guidance).

    For a neural teacher (one with a `.network`), precision="bf16" runs the network under bf16
    autocast (the solver's arithmetic stays float32), channels_last and compile (torch.compile,
    default mode) speed it up on a GPU."""
    idx = output_indices(grid, times)
    dtype = teacher.solve_dtype
    net = teacher.network
    if net is not None and channels_last:
        net.to(memory_format=torch.channels_last)
    if net is not None and compile:
        net.forward = torch.compile(net.forward)
    device_type = torch.device(device).type
    autocast = dtype == torch.float32 and precision == "bf16"

    @torch.no_grad()
    def solve_batch(x_T: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = prior_state(teacher, x_T.to(device=device, dtype=dtype))
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            traj = solve(teacher, x, grid, solver=sc.name, order=sc.order, return_trajectory=idx, cond=labels,
                         **sc.solve_options())
        return traj.transpose(0, 1).to(torch.float32).cpu()

    return solve_batch


def fingerprint(rc: RunConfig, teacher: Teacher, grid: torch.Tensor, shape: tuple[int, ...]) -> dict[str, Any]:
    """What a trajectory data set must match to be used with this config."""
    solver = {**solver_spec(rc.solver), "precision": rc.data.precision if teacher.solve_dtype == torch.float32
              else "float64"}
    fp = {"teacher": teacher.fingerprint(), "solver": solver,
          "grid": [float(t) for t in grid], "times": [float(t) for t in rc.data.times],
          "state_shape": list(shape), "dtype": "float32"}
    weights = class_weights(rc, teacher)
    if weights:
        fp[LABELS] = label_rule(weights)
    return fp


def class_weights(rc: RunConfig, teacher: Teacher) -> list[float]:
    """The weights the trajectories' labels are drawn with: data.class_weights, else the teacher's own
    (`class_weights`), else uniform; [] for an unconditional teacher. ConfigError when
    data.class_weights does not fit the teacher."""
    name = getattr(teacher, "name", None) or type(teacher).__name__
    given = rc.data.class_weights
    num_classes = getattr(teacher, "num_classes", None)      # PSLD teachers have none
    if num_classes is None:
        if given is not None:
            fail("data.class_weights", given, f"is for a class-conditional teacher; teacher {name} is "
                  f"unconditional: remove it")
        return []
    if given is None:
        return teacher_class_weights(teacher)
    if len(given) != num_classes:
        fail("data.class_weights", given, f"needs one weight per class of teacher {name} ({num_classes} classes)")
    return list(given)


def teacher_solve(rc: RunConfig, teacher: Teacher, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The teacher stage's solve of `rc` (`make_solve` on rc's solver grid, with data.precision, compile and
    channels_last) with the teacher moved to `device`; training's fresh trajectories use it too."""
    times = [float(t) for t in rc.data.times]
    grid = solver_grid(teacher, rc.solver, times)      # before the move: the grid the fingerprint records
    teacher.to(device)
    return make_solve(teacher, rc.solver, grid, times, device, rc.data.precision, rc.data.compile,
                      rc.data.channels_last)


def generate(rc: RunConfig, teacher: Teacher, shape: tuple[int, ...], progress: bool = True):
    """Write (or resume, or repair) the trajectory data set of `rc` into rc.data.dir; a NaN/inf
    state stops it before its shard is written (`NonFiniteStatesError` names the trajectories)."""
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    fp = expected_fingerprint(rc, teacher, shape)
    return generate_dataset(
        Path(rc.data.dir), solve=teacher_solve(rc, teacher, device), fingerprint=fp,
        num_trajectories=rc.data.num_trajectories, shard_size=rc.data.shard_size, state_shape=shape, seed=rc.seed,
        batch_size=rc.data.batch_size,
        repair=rc.data.repair, progress=progress, verify=rc.data.verify)


def expected_fingerprint(rc: RunConfig, teacher: Teacher, shape: tuple[int, ...]) -> dict[str, Any]:
    times = [float(t) for t in rc.data.times]
    return fingerprint(rc, teacher, solver_grid(teacher, rc.solver, times), shape)
