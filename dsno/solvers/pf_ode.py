"""Classic Euler and Heun on the probability-flow ODE, in one of two variables.

space="sigma" (default, as EDM, Karras et al. 2022): v = x / alpha against rho = sigma / alpha,
  dv/drho = eps(alpha v, t(rho)). Euler in this variable is exactly DDIM; Heun is EDM's
  deterministic second-order sampler (with t_end > 0 every step, the last included, is Heun).
space="t": x against schedule time, dx/dt = f x + sigma (g - f) eps, f = d log alpha / dt,
  g = d log sigma / dt (any scalar process; on VP this is f (x - eps / sigma), f = -beta(t) / 2,
  the plain PF-ODE of Song et al. 2021; stiff near t = 0, a weak baseline).
"""

from __future__ import annotations

import torch

from dsno.solvers.core import Point, Trajectory, combine, finish, grid_points
from dsno.solvers.registry import choice, register

SPACES = ("sigma", "t")


def _slope(teacher, x: torch.Tensor, p: Point, space: str) -> torch.Tensor:
    """dv/drho (sigma space, returned for the state x) or dx/dt (t space) at point p."""
    eps = teacher.eps(x, p.t)
    if space == "sigma":
        return eps
    f = float(teacher.schedule.d_log_alpha_dt(p.t))
    g = float(teacher.schedule.d_log_sigma_dt(p.t))
    return combine([(f, x), (p.sigma * (g - f), eps)])


def _run(teacher, x: torch.Tensor, ts: torch.Tensor, space: str, heun: bool, return_trajectory: bool,
         denoise_to_zero: bool) -> torch.Tensor:
    choice("space", space, SPACES)
    pts = grid_points(teacher.schedule, ts)
    traj = Trajectory(x, return_trajectory)
    for s, t in zip(pts[:-1], pts[1:]):
        if space == "sigma":
            # state v = x / alpha, step d rho; the slope is evaluated at x = alpha v
            d, scale_s, scale_t = t.rho - s.rho, 1.0 / s.alpha, t.alpha
        else:
            d, scale_s, scale_t = t.t - s.t, 1.0, 1.0
        v = x * scale_s
        k1 = _slope(teacher, x, s, space)
        v_next = combine([(1.0, v), (d, k1)])
        if heun:
            k2 = _slope(teacher, v_next * scale_t, t, space)
            v_next = combine([(1.0, v), (0.5 * d, k1), (0.5 * d, k2)])
        x = v_next * scale_t
        traj.add(x)
    return finish(x, pts[-1], traj, denoise_to_zero, teacher.x0)


@register("euler", orders=(1,), cost=lambda steps, order, o: steps + int(o["denoise_to_zero"]),
          cost_rule="1 per step (+1 with denoise_to_zero)")
def euler(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
          space: str = "sigma", denoise_to_zero: bool = False) -> torch.Tensor:
    """Euler's method on the PF-ODE (space='sigma': identical to DDIM)."""
    return _run(teacher, x, ts, space, False, return_trajectory, denoise_to_zero)


@register("heun", orders=(2,), cost=lambda steps, order, o: 2 * steps + int(o["denoise_to_zero"]),
          cost_rule="2 per step (+1 with denoise_to_zero)")
def heun(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 2, return_trajectory: bool = False,
         space: str = "sigma", denoise_to_zero: bool = False) -> torch.Tensor:
    """Heun's method (explicit trapezoid) on the PF-ODE (space='sigma': EDM's sampler)."""
    return _run(teacher, x, ts, space, True, return_trajectory, denoise_to_zero)
