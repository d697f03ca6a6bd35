"""DEIS (Zhang & Chen 2023): exponential integrators with polynomial noise extrapolation.

In v = x / alpha and rho = sigma / alpha the probability-flow ODE is dv/drho = eps, so
x_t = alpha_t (x_s / alpha_s + int_{rho_s}^{rho_t} eps d rho) exactly. The variants differ in
how eps is approximated on a step:

- "tab"    (tAB-DEIS, default): Lagrange polynomial in t through the last `order` evaluations;
- "logrho" (diffusers' DEISMultistepScheduler): the same in log rho = -lambda;
- "rhoab"  (rhoAB-DEIS): the same in rho;
- "rhork"  (rhoRK-DEIS): a Runge-Kutta method in (v, rho) with `order` stages (Euler, Heun,
  Kutta-3, classic RK4), costing `order` evaluations per step.

The multistep weights are the integrals of the Lagrange basis over the step, computed by
Gauss-Legendre quadrature in log rho (`coefficients.lagrange_kernel_weights`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dsno.schedules import VPSchedule
from dsno.solvers.coefficients import RK_TABLEAUX, lagrange_kernel_weights
from dsno.solvers.core import Point, Trajectory, combine, finish, grid_points, point_at_rho, step_orders
from dsno.solvers.registry import choice, register, reject_unused

VARIANTS = ("tab", "logrho", "rhoab", "rhork")


def _deis_cost(steps: int, order: int, o: dict) -> int:
    per_step = order if choice("variant", o["variant"], VARIANTS) == "rhork" else 1
    return per_step * steps + int(o["denoise_to_zero"])


def interpolation_variable(schedule: VPSchedule, variant: str
                           ) -> tuple[Callable[[Point], float], Callable[[np.ndarray], np.ndarray]]:
    """(xi of a Point, xi as a vectorised function of log rho) for an Adams-Bashforth variant."""
    if variant == "tab":
        return (lambda p: p.t), (lambda u: schedule.t_of_lam(torch.from_numpy(-u)).numpy())
    if variant == "logrho":
        return (lambda p: p.log_rho), (lambda u: u)
    return (lambda p: p.rho), np.exp


@register("deis", orders=(1, 2, 3, 4), cost=_deis_cost,
          cost_rule="1 per step, `order` per step for variant='rhork' (+1 with denoise_to_zero)")
def deis(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 3, return_trajectory: bool = False,
         variant: str = "tab", lower_order_final: bool | str = True, denoise_to_zero: bool = False) -> torch.Tensor:
    """DEIS of the given order; multistep variants warm up with lower orders (see core.step_orders)."""
    choice("variant", variant, VARIANTS)
    schedule = teacher.schedule
    pts = grid_points(schedule, ts)
    traj = Trajectory(x, return_trajectory)
    if variant == "rhork":
        reject_unused("variant='rhork' (a single-step method)", lower_order_final=(lower_order_final, True))
        tableau = RK_TABLEAUX[order]
        for s, t in zip(pts[:-1], pts[1:]):
            x = _rk_step(teacher, x, s, t, tableau)
            traj.add(x)
        return finish(x, pts[-1], traj, denoise_to_zero, teacher.x0)

    xi_of_point, xi_of_log_rho = interpolation_variable(schedule, variant)
    orders = step_orders(order, len(pts) - 1, lower_order_final, int(denoise_to_zero))
    history: list[tuple[float, torch.Tensor]] = []          # (xi, eps), newest first
    for i, (s, t) in enumerate(zip(pts[:-1], pts[1:])):
        history = [(xi_of_point(s), teacher.eps(x, s.t))] + history[: order - 1]
        used = history[: orders[i]]
        c = lagrange_kernel_weights([xi for xi, _ in used], s.log_rho, t.log_rho, xi_of_log_rho)
        x = combine([(t.alpha / s.alpha, x)] + [(t.alpha * cj, eps) for cj, (_, eps) in zip(c, used)])
        traj.add(x)
    return finish(x, pts[-1], traj, denoise_to_zero, teacher.x0)


def _rk_step(teacher, x: torch.Tensor, s: Point, t: Point, tableau) -> torch.Tensor:
    """One explicit Runge-Kutta step of dv/drho = eps(alpha v, t(rho)), v = x / alpha."""
    c, a, b = tableau
    d_rho = t.rho - s.rho
    v = x / s.alpha
    slopes: list[torch.Tensor] = []
    for ci, row in zip(c, a):
        p = s if ci == 0.0 else t if ci == 1.0 else point_at_rho(teacher.schedule, s.rho + ci * d_rho)
        vi = combine([(1.0, v)] + [(d_rho * aij, k) for aij, k in zip(row, slopes)])
        slopes.append(teacher.eps(vi * p.alpha, p.t))
    v = combine([(1.0, v)] + [(d_rho * bi, k) for bi, k in zip(b, slopes)])
    return v * t.alpha
