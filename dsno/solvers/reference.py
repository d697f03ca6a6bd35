"""Reference solutions of a teacher's probability-flow ODE, the yardstick eval and the search score against.

- scalar teachers (VP / VE / flow): DPM-Solver++ 3M on `steps` log-SNR steps, state in float64;
- augmented teachers (PSLD): scipy's adaptive DOP853 (8th order) on the augmented PF-ODE
  dz/dt = beta F z - 1/2 beta D score(z, t), float64, to relative and absolute tolerance `rtol`
  (the library's PSLD samplers are first order, so none of them makes a reference in few steps).

`rmse` is the distance to a reference that both report.
"""

from __future__ import annotations

from typing import Any

import torch

from dsno.solvers import solve, timesteps
from dsno.solvers.psld import apply


REFERENCE_SOLVER = ("dpm_solver_pp", 3)          # scalar teachers: the solver and order of the reference
REFERENCE_LABEL = f"{REFERENCE_SOLVER[0]}-{REFERENCE_SOLVER[1]}"


def describe(teacher: Any, steps: int, rtol: float) -> dict[str, Any]:
    """What reference_solve(teacher, ..., steps, rtol) does, for a record (metrics.json "reference")."""
    if getattr(teacher, "augmented", False):
        return {"solver": "DOP853 (scipy, adaptive) on the augmented PF-ODE", "dtype": "float64", "rtol": rtol}
    return {"solver": REFERENCE_LABEL, "steps": steps, "dtype": "float64"}


def calls_per_batch(teacher: Any, steps: int) -> int | None:
    """Teacher evaluations reference_solve makes on one batch; None when adaptive (unknown beforehand)."""
    return None if getattr(teacher, "augmented", False) else steps


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean squared error over samples and pixels (float64)."""
    return float((x.double() - ref.double()).square().mean().sqrt())


def reference_solve(teacher: Any, x: torch.Tensor, t_end: float, steps: int = 500, rtol: float = 1e-7,
                    stats: dict | None = None) -> torch.Tensor:
    """The final state at t_end of the ODE from the start state x [B, ...] at the grid's T: float64.
    stats: a dict that gets "calls", the teacher evaluations the solve made."""
    x = x.to(torch.float64)
    stats = {} if stats is None else stats
    if not getattr(teacher, "augmented", False):
        grid = timesteps(teacher.schedule, steps=steps, spacing="logsnr", t_end=t_end)
        stats["calls"] = steps
        return solve(teacher, x, grid, solver=REFERENCE_SOLVER[0], order=REFERENCE_SOLVER[1])
    return _dop853(teacher, x, t_end, rtol, stats)


def _dop853(teacher: Any, z: torch.Tensor, t_end: float, rtol: float, stats: dict) -> torch.Tensor:
    from scipy.integrate import solve_ivp  # deferred: loads scipy only when used
    proc, k, shape, device = teacher.process, int(teacher.process.k), z.shape, z.device
    stats["calls"] = 0

    def slope(t: float, y):
        stats["calls"] += 1
        s = torch.from_numpy(y).reshape(shape).to(device)
        d = apply(proc.drift(t), s, k) - 0.5 * apply(proc.diffusion(t), teacher.score(s, t).to(s.dtype), k)
        return d.reshape(-1).cpu().numpy()

    sol = solve_ivp(slope, (float(proc.T), float(t_end)), z.reshape(-1).cpu().numpy(), method="DOP853",
                    rtol=rtol, atol=rtol)
    if sol.status != 0:
        raise RuntimeError(f"the DOP853 reference solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device)
