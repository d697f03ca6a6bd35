"""What every solver shares: grid points in float64, the per-step order rule, the trajectory
record, the final denoising step and the noise of stochastic solvers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from dsno.schedules import VPSchedule

# lower_order_final: on runs of fewer than this many solver updates, the last updates use a
# lower order (diffusers' DPMSolverMultistep / DEIS rule; the DPM-Solver reference uses 10).
LOWER_ORDER_FINAL_BELOW = 15

NoiseSampler = Callable[[float, float], torch.Tensor]


@dataclass(frozen=True)
class Point:
    """One time of a solve, in float64: t (schedule time), alpha, sigma, lam = log(alpha / sigma)
    of the schedule's x_t = alpha x0 + sigma eps (any scalar linear process: VP, VE, flow)."""

    t: float
    alpha: float
    sigma: float
    lam: float

    @property
    def rho(self) -> float:
        """sigma / alpha (the EDM sigma)."""
        return self.sigma / self.alpha

    @property
    def log_rho(self) -> float:
        return -self.lam


def grid_points(schedule: VPSchedule, ts: torch.Tensor) -> list[Point]:
    """The Points of a (validated, float64) grid."""
    a, s, lam = schedule.alpha(ts), schedule.sigma(ts), schedule.lam(ts)
    return [Point(*v) for v in zip(ts.tolist(), a.tolist(), s.tolist(), lam.tolist())]


def _softplus(v: float) -> float:
    return v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v))


def point_at_lam(schedule: VPSchedule, lam: float) -> Point:
    """The Point with half log-SNR `lam` (for stages between grid points); alpha and sigma come
    from the schedule's own `alpha_sigma_of_lam` (VP, VE, flow), or from the VP identity
    alpha^2 = sigmoid(2 lam) for a schedule without one."""
    t = float(schedule.t_of_lam(lam))
    of_lam = getattr(schedule, "alpha_sigma_of_lam", None)
    if of_lam is None:
        return Point(t, math.exp(-0.5 * _softplus(-2.0 * lam)), math.exp(-0.5 * _softplus(2.0 * lam)), lam)
    alpha, sigma = of_lam(lam)
    return Point(t, float(alpha), float(sigma), lam)


def point_at_rho(schedule: VPSchedule, rho: float) -> Point:
    """The Point with sigma / alpha = rho."""
    return point_at_lam(schedule, -math.log(rho))


def step_orders(order: int, steps: int, lower_order_final: bool | str, extra_updates: int = 0) -> list[int]:
    """Order of each step of a multistep method.

    Warm-up: step i (0-based) uses at most i + 1 (only i past evaluations exist).
    lower_order_final=True: when the run has fewer than LOWER_ORDER_FINAL_BELOW updates in all
    (steps + extra_updates, where the final denoising step of `denoise_to_zero` counts as one
    first-order update), step i uses at most (updates - i): the last grid step is first order,
    the one before second order, ...; with denoise_to_zero the last grid step is second order.
    This is diffusers' rule for DPMSolverMultistep and DEIS (its final sigma 0 is our
    denoise_to_zero). "always": the same on grids of any length (diffusers' UniPC; more accurate
    on grids whose last steps are long in log-SNR, e.g. time_uniform to t_end = 1e-3). False: never.
    """
    if lower_order_final not in (True, False, "always"):
        raise ValueError(f"option lower_order_final={lower_order_final!r} must be True, False or 'always'")
    total = steps + extra_updates
    lower = lower_order_final == "always" or (bool(lower_order_final) and total < LOWER_ORDER_FINAL_BELOW)
    out = []
    for i in range(steps):
        p = min(order, i + 1)
        if lower:
            p = min(p, total - i)
        out.append(p)
    return out


class Trajectory:
    """The states at the grid points, kept only when asked for.

    keep: False (none), True (all: entry i is the state at grid point i, x_T first), or a
    sorted tuple of grid indices: only those states are held, so memory does not grow with the
    number of steps (see `registry.trajectory_indices`)."""

    def __init__(self, x: torch.Tensor, keep: "bool | tuple[int, ...]"):
        self.wanted = None if isinstance(keep, bool) else frozenset(keep)
        self.states: list[torch.Tensor] | None = [] if keep is not False else None
        self.index = -1
        self.add(x)

    def add(self, x: torch.Tensor) -> None:
        self.index += 1
        if self.states is not None and (self.wanted is None or self.index in self.wanted):
            self.states.append(x)

    def result(self, x: torch.Tensor) -> torch.Tensor:
        """x (the final state) or the stacked kept states [K, B, ...]."""
        if self.states is None:
            return x
        if self.wanted is not None and len(self.states) != len(self.wanted):
            raise ValueError(f"return_trajectory asked for grid indices up to {max(self.wanted)}, but the solve "
                             f"has {self.index + 1} states")
        return torch.stack(self.states)


def finish(x: torch.Tensor, last: Point, traj: Trajectory, denoise_to_zero: bool,
           x0_fn: Callable[[torch.Tensor, float], torch.Tensor]) -> torch.Tensor:
    """The solver's output: the last state, or with denoise_to_zero the data prediction
    x0_fn(x, t_end) (one more model evaluation; it is appended to the trajectory)."""
    if denoise_to_zero:
        x = x0_fn(x, last.t)
        traj.add(x)
    return traj.result(x)


def noise_source(x: torch.Tensor, generator: torch.Generator | None,
                 noise_sampler: NoiseSampler | None) -> NoiseSampler:
    """noise(s, t) -> a standard normal tensor like x for the step s -> t: from `noise_sampler`
    when given (it must return x's shape), else drawn with `generator`."""
    if noise_sampler is not None:
        def checked(s: float, t: float) -> torch.Tensor:
            z = noise_sampler(s, t)
            if not isinstance(z, torch.Tensor) or z.shape != x.shape:
                raise ValueError(f"noise_sampler must return a tensor of shape {tuple(x.shape)}, got "
                                 f"{tuple(getattr(z, 'shape', ()))}")
            return z.to(device=x.device, dtype=x.dtype)
        return checked
    return lambda s, t: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def combine(terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum_k c_k T_k for Python-float (float64) weights c_k, in the tensors' dtype."""
    out = terms[0][1] * terms[0][0]
    for c, v in terms[1:]:
        if c != 0.0:
            out = out.add(v, alpha=c)
    return out
