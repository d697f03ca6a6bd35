"""iPNDM (improved PNDM, Zhang & Chen 2023): the DDIM step with an Adams-Bashforth mean of the
last `order` noise predictions, warming up with lower orders instead of PNDM's Runge-Kutta start.

The weights are the fixed equal-step Adams-Bashforth weights, so in v = x / alpha,
rho = sigma / alpha this is AB in rho: order p on a grid uniform in rho (karras spacing with
rho=1), and at most order 2 on any other grid (the fixed weights ignore the varying step).
"""

from __future__ import annotations

import math

import torch

from dsno.solvers.coefficients import ADAMS_BASHFORTH
from dsno.solvers.core import Trajectory, combine, finish, grid_points, step_orders
from dsno.solvers.registry import register


@register("ipndm", orders=(1, 2, 3, 4), cost=lambda steps, order, o: steps + int(o["denoise_to_zero"]),
          cost_rule="1 per step (+1 with denoise_to_zero)")
def ipndm(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 4, return_trajectory: bool = False,
          lower_order_final: bool | str = True, denoise_to_zero: bool = False) -> torch.Tensor:
    """x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) sum_j w_j eps_{s-j},  w: Adams-Bashforth."""
    pts = grid_points(teacher.schedule, ts)
    orders = step_orders(order, len(pts) - 1, lower_order_final, int(denoise_to_zero))
    traj = Trajectory(x, return_trajectory)
    history: list[torch.Tensor] = []                       # eps, newest first
    for i, (s, t) in enumerate(zip(pts[:-1], pts[1:])):
        history = [teacher.eps(x, s.t)] + history[: order - 1]
        ddim_coef = -t.sigma * math.expm1(t.lam - s.lam)
        weights = ADAMS_BASHFORTH[orders[i]]
        x = combine([(t.alpha / s.alpha, x)] + [(ddim_coef * w, e) for w, e in zip(weights, history)])
        traj.add(x)
    return finish(x, pts[-1], traj, denoise_to_zero, teacher.x0)
