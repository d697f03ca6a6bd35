"""Time grids for the solvers: float64, strictly decreasing, inside the schedule's [t_min, T].
The schedule is any scalar process (VP, VE, flow): every spacing goes through its lam / t_of_lam.

`timesteps(schedule, steps, spacing)` builds one; `from_grid(schedule, values, kind)` turns a
user's grid (times, EDM sigmas, log-SNRs or DDPM step indices) into one; `check_grid` is the
validation every solver applies to the grid it is given.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dsno.schedules import VPSchedule

SPACINGS = ("time_uniform", "time_quadratic", "logsnr", "karras")
GRID_KINDS = ("t", "sigma", "lambda", "index")
_TOL = 1e-12


def check_grid(schedule: VPSchedule, ts: Any, name: str = "ts") -> torch.Tensor:
    """Validate a grid and return it as a float64 CPU tensor [N + 1].

    Rejects (with the offending value): fewer than 2 points, NaN / inf, a repeated time, a
    time that does not decrease, a time outside [schedule.t_min, schedule.T].
    """
    if isinstance(ts, torch.Tensor):
        ts = ts.detach().to("cpu", torch.float64)
    else:
        try:
            ts = torch.as_tensor(np.asarray(ts, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be a 1-D sequence of times, got {ts!r}") from e
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 times (start and end), got shape {tuple(ts.shape)}")
    bad = torch.nonzero(~torch.isfinite(ts))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] = {float(ts[i])}: a grid must hold finite times")
    diff = ts[1:] - ts[:-1]
    same = torch.nonzero(diff == 0)
    if len(same):
        i = int(same[0])
        raise ValueError(f"{name}[{i}] and {name}[{i + 1}] are both {float(ts[i]):.17g}: a grid must not repeat "
                         f"a time (a zero-length step divides by zero)")
    up = torch.nonzero(diff > 0)
    if len(up):
        i = int(up[0])
        raise ValueError(f"{name} must be strictly decreasing (from noise to data): {name}[{i + 1}] = "
                         f"{float(ts[i + 1]):.17g} follows {name}[{i}] = {float(ts[i]):.17g}")
    for i in (0, len(ts) - 1):
        v = float(ts[i])
        if not (schedule.t_min - _TOL <= v <= schedule.T + _TOL):
            raise ValueError(f"{name}[{i}] = {v:.17g} lies outside [t_min, T] = [{schedule.t_min:g}, "
                             f"{schedule.T:g}] of {schedule!r}")
    return ts.contiguous()


def _check_endpoints(schedule: VPSchedule, t_start: float, t_end: float) -> None:
    for label, v in (("t_start", t_start), ("t_end", t_end)):
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"{label} must be a finite number, got {v!r}")
        if not (schedule.t_min - _TOL <= v <= schedule.T + _TOL):
            raise ValueError(f"{label} = {v:g} lies outside [t_min, T] = [{schedule.t_min:g}, {schedule.T:g}] "
                             f"of {schedule!r}")
    if not t_start > t_end:
        raise ValueError(f"t_start = {t_start:g} must be greater than t_end = {t_end:g} (sampling runs from noise "
                         f"to data)")


def timesteps(schedule: VPSchedule, steps: int = 10, spacing: str = "logsnr", t_start: float | None = None,
              t_end: float | None = None, *, rho: float = 7.0) -> torch.Tensor:
    """A decreasing float64 grid [steps + 1] from t_start (default schedule.T) to t_end.

    schedule: any scalar process (VP, VE, flow). t_end: None (default) means
    max(1e-3, schedule.t_min): 1e-3 for VP and flow, sigma_min = 0.002 for the default VE.

    spacing: "time_uniform" (uniform in t), "time_quadratic" (uniform in sqrt t, DEIS / DSNO),
    "logsnr" (uniform in lambda, DPM-Solver's default), "karras" (EDM: uniform in
    (sigma/alpha)^(1/rho), rho = 7). The end points are exactly t_start and t_end.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    t_start = float(schedule.T) if t_start is None else float(t_start)
    if t_end is None:
        t_end = max(1e-3, float(schedule.t_min))
    t_end = float(t_end)
    _check_endpoints(schedule, t_start, t_end)
    n = int(steps)
    u = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    if spacing == "time_uniform":
        ts = t_start + u * (t_end - t_start)
    elif spacing == "time_quadratic":
        ts = (math.sqrt(t_start) + u * (math.sqrt(t_end) - math.sqrt(t_start))) ** 2
    elif spacing == "logsnr":
        lam_a, lam_b = float(schedule.lam(t_start)), float(schedule.lam(t_end))
        ts = schedule.t_of_lam(lam_a + u * (lam_b - lam_a))
    else:
        if not rho > 0:
            raise ValueError(f"karras spacing needs rho > 0, got {rho!r}")
        r_a = float(schedule.sigma(t_start) / schedule.alpha(t_start)) ** (1.0 / rho)
        r_b = float(schedule.sigma(t_end) / schedule.alpha(t_end)) ** (1.0 / rho)
        ts = schedule.t_of_sigma_over_alpha((r_a + u * (r_b - r_a)) ** rho)
    ts = ts.clone()
    ts[0], ts[-1] = t_start, t_end
    return check_grid(schedule, ts, name=f"the {spacing} grid")


def from_grid(schedule: VPSchedule, values: Any, kind: str = "t") -> torch.Tensor:
    """A user's grid as schedule times: float64 [N + 1], validated.

    kind: "t" (schedule times), "sigma" (EDM sigmas, sigma_t / alpha_t), "lambda" (half
    log-SNR), "index" (DDPM step indices i of a discrete schedule with N steps: t = (i + 1) / N).
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; use one of {', '.join(GRID_KINDS)}")
    v = values.detach().to("cpu", torch.float64) if isinstance(values, torch.Tensor) else \
        torch.as_tensor(np.asarray(values, dtype=np.float64))
    if kind == "sigma":
        if bool((v <= 0).any()):
            raise ValueError(f"EDM sigmas must be > 0 (sigma = 0 is t = 0, outside every schedule), got "
                             f"{float(v.min()):g}")
        v = schedule.t_of_sigma_over_alpha(v)
    elif kind == "lambda":
        v = schedule.t_of_lam(v)
    elif kind == "index":
        if schedule.kind != "discrete":
            raise ValueError(f"kind='index' needs a discrete schedule (VPSchedule.discrete), got {schedule!r}")
        v = (v + 1.0) / schedule.num_steps
    return check_grid(schedule, v, name=f"the {kind} grid")


timesteps.from_grid = from_grid
