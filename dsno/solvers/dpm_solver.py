"""DPM-Solver (Lu et al. 2022, noise prediction) and DPM-Solver++ (Lu et al. 2022b, data prediction).

Both approximate the exact solution (see `coefficients.exponential_frame`)

    x_t = ratio x_s - gain sum_k z phi_{k+1}(z) h^k f^(k)(lambda_s),   f = eps or x0,

- singlestep ("singlestep"; the reference code's "singlestep_fixed"): every grid step is one
  DPM-Solver-k step, k - 1 extra evaluations inside it at r = 1/2 (k = 2) or r = 1/3, 2/3 (k = 3)
  of the step in log-SNR; `order` evaluations per step.
- NFE-budget mix ("fast", DPM-Solver's `dpm_solver_fast`): `ts` is read as a grid of NFE
  steps; the solver takes K steps of orders `fast_orders(NFE, order)` (e.g. 3, 3, ..., 2, 1).
  With `fast_outer="logsnr"` (the default, as the DPM-Solver reference and k-diffusion do)
  the K outer steps are equal in log-SNR from ts[0] to ts[-1], whatever their order; with
  `fast_outer="grid"` step k spans as many grid intervals as its order, between the grid
  points ts[c_k], c = cumsum(orders) (the reference's rule for its other skip types).
  Grid points inside a step get no state, so it has no `return_trajectory`.
- multistep ("multistep", DPM-Solver++ only, default): 2M / 3M with derivatives from past
  evaluations, one evaluation per step. 3M estimates h^2 x0'' correctly; `shipped_3m=True`
  reproduces the public code's half-size second difference (order 2).
"""

from __future__ import annotations

from typing import Callable

import torch

from dsno.solvers.coefficients import (SINGLESTEP_R, exponential_frame, fast_orders, multistep_weights,
                                       singlestep_stage_weights)
from dsno.solvers.core import Point, Trajectory, combine, finish, grid_points, point_at_lam, step_orders
from dsno.solvers.registry import choice, register, reject_unused

Prediction = Callable[[torch.Tensor, float], torch.Tensor]
NOISE_METHODS = ("singlestep", "fast")
FAST_OUTER = ("logsnr", "grid")
DATA_METHODS = ("multistep", "singlestep", "fast")
SOLVER_TYPES = ("midpoint", "heun")


def _frame(s: Point, t: Point, data: bool) -> tuple[float, float, float]:
    return exponential_frame(s.lam, t.lam, (s.alpha, t.alpha), (s.sigma, t.sigma), data)


def _cost(methods: tuple[str, ...]):
    def cost(steps: int, order: int, o: dict) -> int:
        per_step = order if choice("method", o["method"], methods) == "singlestep" else 1
        return per_step * steps + int(o["denoise_to_zero"])
    return cost


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_val: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = clamp(quantile_ratio |x0|, 1, max_val) per sample;
    x0 -> clamp(x0, -s, s) / s."""
    flat = x0.reshape(x0.shape[0], -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(min=1.0, max=max_val).unsqueeze(1)
    return (torch.clamp(work, -s, s) / s).to(x0.dtype).reshape(x0.shape)


def singlestep_update(schedule, f: Prediction, x: torch.Tensor, s: Point, t: Point, k: int, data: bool
                      ) -> torch.Tensor:
    """One step of DPM-Solver-k (data=False) or DPM-Solver++(kS) (data=True): k evaluations."""
    r = SINGLESTEP_R[k]
    ratio, gain, z = _frame(s, t, data)
    values = [f(x, s.t)]
    for i, ri in enumerate(r):
        p = point_at_lam(schedule, s.lam + ri * (t.lam - s.lam))
        ratio_i, gain_i, _ = _frame(s, p, data)
        w = singlestep_stage_weights(z, r, i + 1)
        u = combine([(ratio_i, x)] + [(-gain_i * wj, v) for wj, v in zip(w, values)])
        values.append(f(u, p.t))
    w = singlestep_stage_weights(z, r, k)
    return combine([(ratio, x)] + [(-gain * wj, v) for wj, v in zip(w, values)])


def _singlestep_run(teacher, x, pts: list[Point], orders: list[int], f: Prediction, data: bool,
                    traj: Trajectory) -> torch.Tensor:
    for s, t, k in zip(pts[:-1], pts[1:], orders):
        x = singlestep_update(teacher.schedule, f, x, s, t, k, data)
        traj.add(x)
    return x


def _fast_points(schedule, pts: list[Point], order: int, return_trajectory: bool, outer: str
                 ) -> tuple[list[Point], list[int]]:
    """The outer step points and orders of the NFE-budget mix on the grid `pts` (see module doc)."""
    choice("fast_outer", outer, FAST_OUTER)
    if return_trajectory:
        raise ValueError("method='fast' skips the grid points inside its steps, so it has no trajectory; use "
                         "method='singlestep' on the grid of the points you need")
    orders = fast_orders(len(pts) - 1, order)
    if outer == "logsnr":
        lam0, lam1, k = pts[0].lam, pts[-1].lam, len(orders)
        inner = [point_at_lam(schedule, lam0 + (lam1 - lam0) * i / k) for i in range(1, k)]
        return [pts[0], *inner, pts[-1]], orders
    idx = [0]
    for k in orders:
        idx.append(idx[-1] + k)
    return [pts[i] for i in idx], orders


@register("dpm_solver", orders=(1, 2, 3), cost=_cost(NOISE_METHODS),
          cost_rule="`order` per step for method='singlestep', 1 per grid step for method='fast' "
                    "(+1 with denoise_to_zero)")
def dpm_solver(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 3, return_trajectory: bool = False,
               method: str = "singlestep", fast_outer: str = "logsnr", denoise_to_zero: bool = False
               ) -> torch.Tensor:
    """DPM-Solver-1/2/3 (noise prediction), singlestep or the NFE-budget mix (see module doc)."""
    choice("method", method, NOISE_METHODS)
    pts = grid_points(teacher.schedule, ts)
    traj = Trajectory(x, return_trajectory)
    if method == "fast":
        pts, orders = _fast_points(teacher.schedule, pts, order, return_trajectory, fast_outer)
    else:
        reject_unused(f"method={method!r}", fast_outer=(fast_outer, "logsnr"))
        orders = [order] * (len(pts) - 1)
    x = _singlestep_run(teacher, x, pts, orders, teacher.eps, False, traj)
    return finish(x, pts[-1], traj, denoise_to_zero, teacher.x0)


@register("dpm_solver_pp", orders=(1, 2, 3), cost=_cost(DATA_METHODS),
          cost_rule="1 per step for method='multistep' and 'fast', `order` per step for 'singlestep' "
                    "(+1 with denoise_to_zero)")
def dpm_solver_pp(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 3, return_trajectory: bool = False,
                  method: str = "multistep", solver_type: str = "midpoint", shipped_3m: bool = False,
                  lower_order_final: bool | str = True, thresholding: bool = False, ratio: float = 0.995,
                  max_val: float = 1.0, fast_outer: str = "logsnr", denoise_to_zero: bool = False) -> torch.Tensor:
    """DPM-Solver++ (data prediction): multistep 1M/2M/3M (default), singlestep 1S/2S/3S, or the
    NFE-budget mix. thresholding=True applies dynamic thresholding (ratio, max_val) to every
    data prediction (for pixel-space models with data in [-1, 1])."""
    choice("method", method, DATA_METHODS)
    choice("solver_type", solver_type, SOLVER_TYPES)
    if thresholding:
        if not (0.0 < ratio <= 1.0 and max_val >= 1.0):
            raise ValueError(f"thresholding needs 0 < ratio <= 1 and max_val >= 1, got ratio={ratio!r}, "
                             f"max_val={max_val!r}")
        f = lambda v, t: dynamic_threshold(teacher.x0(v, t), ratio, max_val)  # noqa: E731
    else:
        reject_unused("thresholding=False", ratio=(ratio, 0.995), max_val=(max_val, 1.0))
        f = teacher.x0
    pts = grid_points(teacher.schedule, ts)
    traj = Trajectory(x, return_trajectory)
    if method != "multistep":
        reject_unused(f"method={method!r}", solver_type=(solver_type, "midpoint"), shipped_3m=(shipped_3m, False),
                      lower_order_final=(lower_order_final, True))
        if method == "fast":
            pts, orders = _fast_points(teacher.schedule, pts, order, return_trajectory, fast_outer)
        else:
            reject_unused(f"method={method!r}", fast_outer=(fast_outer, "logsnr"))
            orders = [order] * (len(pts) - 1)
        x = _singlestep_run(teacher, x, pts, orders, f, True, traj)
        return finish(x, pts[-1], traj, denoise_to_zero, f)

    reject_unused("method='multistep'", fast_outer=(fast_outer, "logsnr"))
    orders = step_orders(order, len(pts) - 1, lower_order_final, int(denoise_to_zero))
    history: list[tuple[float, torch.Tensor]] = []           # (lambda, x0), newest first
    for i, (s, t) in enumerate(zip(pts[:-1], pts[1:])):
        history = [(s.lam, f(x, s.t))] + history[: order - 1]
        k = orders[i]
        ratio_x, gain, z = _frame(s, t, True)
        h = t.lam - s.lam
        ratios = [(history[j][0] - history[j + 1][0]) / h for j in range(k - 1)]
        w = multistep_weights(z, ratios, k, solver_type, shipped_3m)
        x = combine([(ratio_x, x)] + [(-gain * wj, m) for wj, (_, m) in zip(w, history)])
        traj.add(x)
    return finish(x, pts[-1], traj, denoise_to_zero, f)
