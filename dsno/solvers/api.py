"""`solve`: run any registered solver on a teacher from noise x_T along a grid."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dsno.inputs import check_noise
from dsno.solvers.registry import get
from dsno.teachers.conditional import bind


def solve(teacher, x_T: torch.Tensor, ts: Any = None, solver: str = "dpm_solver_pp", order: int | None = None,
          return_trajectory: bool | Sequence[int] = False, cond: Any = None, **options: Any) -> torch.Tensor:
    """Solve the teacher's probability-flow ODE (or reverse SDE) from x_T at ts[0] along ts.

    teacher: a dsno Teacher (eps / x0 / v prediction, continuous or discrete time).
    x_T: [B, ...] in the working dtype (coefficients are float64, cast to it): finite, and [B, *state_shape]
    when the teacher declares its state shape (else `dsno.inputs.InputError`).
    ts: decreasing schedule times [N + 1] (`timesteps(...)`, `timesteps.from_grid(...)`, or any
    tensor / sequence; validated); None for a solver that carries its own (solver="usf",
    solver_schedule=PATH_OR_SOLVER_SCHEDULE). order: None for the solver's default.
    Returns the state at ts[-1] [B, ...] (the data prediction there with denoise_to_zero=True),
    or with return_trajectory=True the states [len(ts), B, ...] (traj[0] is x_T, traj[i] the state at
    ts[i]; with denoise_to_zero the denoised output is appended as one more entry). A list of
    grid indices keeps only those states, [len(indices), B, ...] in increasing index order, and
    holds no others in memory.
    cond: class labels [B] (LongTensor in [0, teacher.num_classes)) for a class-conditional teacher,
    solved with the teacher's guidance scale (`teacher.conditioned(cond)`); None: the unconditional model.
    options: the solver's own (see `dsno.solvers.registry.get(name).options`).
    """
    check_noise(x_T, getattr(teacher, "state_shape", None))
    teacher = bind(teacher, cond)
    return get(solver).fn(teacher, x_T, ts, order=order, return_trajectory=return_trajectory, **options)
