"""Stochastic baselines: DDPM ancestral sampling and SDE-DPM-Solver++ (1S / 2M).

Both integrate the reverse SDE, so a run depends on the noise (`generator`, or a
`noise_sampler(s, t)` returning standard normal noise for the step s -> t) and converges to
the data distribution, not to the ODE's sample path. The first-order step is the DDPM posterior
q(x_t | x_s, x0 = x0_hat):

    x_t = sigma_t/sigma_s e^{-h} x_s + alpha_t (1 - e^{-2h}) x0_hat + sigma_t sqrt(1 - e^{-2h}) z.
"""

from __future__ import annotations

import torch

from dsno.solvers.coefficients import sde_dpmpp_weights
from dsno.solvers.core import NoiseSampler, Trajectory, combine, finish, grid_points, noise_source, step_orders
from dsno.solvers.registry import choice, register

SOLVER_TYPES = ("midpoint", "heun")


def _run(teacher, x, ts, order, lower_order_final, solver_type, generator, noise_sampler, return_trajectory,
         denoise_to_zero):
    choice("solver_type", solver_type, SOLVER_TYPES)
    pts = grid_points(teacher.schedule, ts)
    orders = step_orders(order, len(pts) - 1, lower_order_final, int(denoise_to_zero))
    noise = noise_source(x, generator, noise_sampler)
    traj = Trajectory(x, return_trajectory)
    history: list[tuple[float, torch.Tensor]] = []          # (lambda, x0), newest first
    for i, (s, t) in enumerate(zip(pts[:-1], pts[1:])):
        history = [(s.lam, teacher.x0(x, s.t))] + history[: order - 1]
        k = orders[i]
        h = t.lam - s.lam
        ratios = [(history[0][0] - history[1][0]) / h] if k == 2 else []
        c_x, w, c_noise = sde_dpmpp_weights(s.lam, t.lam, (s.alpha, t.alpha), (s.sigma, t.sigma), ratios, k,
                                            solver_type)
        x = combine([(c_x, x)] + [(wj, m) for wj, (_, m) in zip(w, history)] + [(c_noise, noise(s.t, t.t))])
        traj.add(x)
    return finish(x, pts[-1], traj, denoise_to_zero, teacher.x0)


@register("ddpm", orders=(1,), cost=lambda steps, order, o: steps + int(o["denoise_to_zero"]),
          cost_rule="1 per step (+1 with denoise_to_zero)", stochastic=True)
def ddpm(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
         generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
         denoise_to_zero: bool = False) -> torch.Tensor:
    """DDPM ancestral sampling on the grid (Ho et al. 2020; = DDIM with eta = 1)."""
    return _run(teacher, x, ts, 1, False, "midpoint", generator, noise_sampler, return_trajectory, denoise_to_zero)


@register("sde_dpm_solver_pp", orders=(1, 2), cost=lambda steps, order, o: steps + int(o["denoise_to_zero"]),
          cost_rule="1 per step (+1 with denoise_to_zero)", stochastic=True)
def sde_dpm_solver_pp(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 2,
                      return_trajectory: bool = False, solver_type: str = "midpoint",
                      lower_order_final: bool | str = True,
                      generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                      denoise_to_zero: bool = False) -> torch.Tensor:
    """SDE-DPM-Solver++ 1S (order 1, = DDPM) or 2M (order 2, multistep, as diffusers' sde-dpmsolver++)."""
    return _run(teacher, x, ts, order, lower_order_final, solver_type, generator, noise_sampler, return_trajectory,
                denoise_to_zero)
