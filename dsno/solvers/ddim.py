"""DDIM (Song et al. 2021): the first-order exponential integrator, with optional noise (eta)."""

from __future__ import annotations

import torch

from dsno.solvers.coefficients import ddim_weights
from dsno.solvers.core import NoiseSampler, Trajectory, combine, finish, grid_points, noise_source
from dsno.solvers.registry import register


@register("ddim", orders=(1,), cost=lambda steps, order, o: steps + int(o["denoise_to_zero"]),
          cost_rule="1 per step (+1 with denoise_to_zero)")
def ddim(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
         eta: float = 0.0, generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
         denoise_to_zero: bool = False) -> torch.Tensor:
    """x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s  (eta = 0).

    eta > 0 adds noise: x_t = alpha_t x0 + sqrt(sigma_t^2 - s^2) eps + s z with
    s^2 = eta^2 sigma_t^2 (1 - e^{-2h}); eta = 1 is DDPM's ancestral step. x: [B, ...] at ts[0].
    """
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise ValueError(f"option eta={eta!r} must be in [0, 1]")
    pts = grid_points(teacher.schedule, ts)
    noise = noise_source(x, generator, noise_sampler) if eta > 0 else None
    traj = Trajectory(x, return_trajectory)
    for s, t in zip(pts[:-1], pts[1:]):
        eps = teacher.eps(x, s.t)
        c_x, c_eps, c_noise = ddim_weights(s.lam, t.lam, (s.alpha, t.alpha), (s.sigma, t.sigma), float(eta))
        terms = [(c_x, x), (c_eps, eps)]
        if noise is not None:
            terms.append((c_noise, noise(s.t, t.t)))
        x = combine(terms)
        traj.add(x)
    return finish(x, pts[-1], traj, denoise_to_zero, teacher.x0)
