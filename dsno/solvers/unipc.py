"""UniPC (Zhao et al. 2023): a multistep predictor (UniP-p) and a corrector (UniC-p) that reuses
the evaluation the next step needs anyway, so it costs no extra model evaluation.

UniP-p is order p; with UniC the order is p + 1. Variants bh1 (B(h) = h) and bh2
(B(h) = e^h - 1); data prediction by default (predict_x0=False: noise prediction). The last
grid step gets no corrector (that would need one more evaluation); with denoise_to_zero the
output is the data prediction at the uncorrected last state, as in diffusers.
"""

from __future__ import annotations

import torch

from dsno.solvers.coefficients import exponential_frame, phi, unipc_weights
from dsno.solvers.core import Point, Trajectory, combine, finish, grid_points, step_orders
from dsno.solvers.registry import choice, register

VARIANTS = ("bh1", "bh2")


def _update(x: torch.Tensor, s: Point, t: Point, history: list[tuple[float, torch.Tensor]], order: int,
            variant: str, data: bool, f_t: torch.Tensor | None) -> torch.Tensor:
    """UniP-order from s to t (f_t None) or UniC-order (f_t: the evaluation at the predicted x_t).
    history: (lambda, f), newest (at s) first."""
    ratio, gain, z = exponential_frame(s.lam, t.lam, (s.alpha, t.alpha), (s.sigma, t.sigma), data)
    h = t.lam - s.lam
    lam_s, f_s = history[0]
    past = history[1:order]
    rks = [(lam_k - lam_s) / h for lam_k, _ in past]
    rhos, b_h = unipc_weights(z, rks, order, variant, corrector=f_t is not None)
    diffs = [(f_k - f_s, rk) for (_, f_k), rk in zip(past, rks)]
    if f_t is not None:
        diffs.append((f_t - f_s, 1.0))
    terms = [(ratio, x), (-gain * z * phi(1, z), f_s)]
    terms += [(-gain * b_h * rho / rk, d) for rho, (d, rk) in zip(rhos, diffs)]
    return combine(terms)


@register("unipc", orders=(1, 2, 3), cost=lambda steps, order, o: steps + int(o["denoise_to_zero"]),
          cost_rule="1 per step, the corrector is free (+1 with denoise_to_zero)")
def unipc(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 3, return_trajectory: bool = False,
          variant: str = "bh2", use_corrector: bool = True, predict_x0: bool = True,
          lower_order_final: bool | str = True, denoise_to_zero: bool = False) -> torch.Tensor:
    """UniPC-p: UniP-p, then UniC-p at every grid point but the last (see module doc)."""
    choice("variant", variant, VARIANTS)
    f = teacher.x0 if predict_x0 else teacher.eps
    pts = grid_points(teacher.schedule, ts)
    steps = len(pts) - 1
    orders = step_orders(order, steps, lower_order_final, int(denoise_to_zero))
    traj = Trajectory(x, return_trajectory)
    history: list[tuple[float, torch.Tensor]] = [(pts[0].lam, f(x, pts[0].t))]
    for i, (s, t) in enumerate(zip(pts[:-1], pts[1:])):
        x_pred = _update(x, s, t, history, orders[i], variant, predict_x0, None)
        if i == steps - 1:
            x = x_pred
            traj.add(x)
            break
        f_t = f(x_pred, t.t)
        x = _update(x, s, t, history, orders[i], variant, predict_x0, f_t) if use_corrector else x_pred
        history = [(t.lam, f_t)] + history[: order - 1]
        traj.add(x)
    return finish(x, pts[-1], traj, denoise_to_zero, teacher.x0)
