"""A scalar schedule seen as a linear SDE with one component per pixel (k = 1), the form the
augmented-process solvers (`dsno.solvers.psld`) take, so that VP, VE and flow run through them too.

x_t = alpha_t x0 + sigma_t eps is the marginal of dx = f x dt + g dW with f = d log alpha / dt and
g^2 = 2 sigma^2 (d log sigma / dt - d log alpha / dt) (VP: f = -beta / 2, g^2 = beta).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from dsno.schedules import Schedule, _f64


@functools.lru_cache(maxsize=8)
def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-point Gauss-Legendre rule on [-1, 1] (nodes, weights)."""
    return np.polynomial.legendre.leggauss(n)


def gl_rule(a: float, b: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the n-point rule on [a, b], float64."""
    gx, gw = gauss_legendre(n)
    half = 0.5 * (b - a)
    return torch.from_numpy(a + half * (gx + 1.0)), torch.from_numpy(gw * half)


class ScalarLinear:
    """The linear-process view of a scalar schedule: drift, diffusion, mean_map, transition and
    kernel_cholesky as [..., 1, 1] float64 tensors; t_min and T those of the schedule."""

    k = 1

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.t_min, self.T = schedule.t_min, schedule.T

    def __repr__(self) -> str:
        return f"ScalarLinear({self.schedule!r})"

    @staticmethod
    def _m(v: torch.Tensor) -> torch.Tensor:
        return v[..., None, None]

    def drift(self, t: Any) -> torch.Tensor:
        return self._m(self.schedule.d_log_alpha_dt(t))

    def diffusion(self, t: Any) -> torch.Tensor:
        s = self.schedule
        return self._m(2.0 * s.sigma(t) ** 2 * (s.d_log_sigma_dt(t) - s.d_log_alpha_dt(t)))

    def mean_map(self, s: Any, t: Any) -> torch.Tensor:
        """alpha_t / alpha_s."""
        return self._m(torch.exp(self.schedule.log_alpha(t) - self.schedule.log_alpha(s)))

    def transition(self, s: Any, t: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t / alpha_s, sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) for s <= t."""
        phi = self.mean_map(s, t)
        return phi, self._m(self.schedule.sigma(t) ** 2) - phi**2 * self._m(self.schedule.sigma(s) ** 2)

    def kernel_cholesky(self, t: Any) -> torch.Tensor:
        """sigma_t: score = -eps / sigma."""
        return self._m(self.schedule.sigma(_f64(t)))

    def quadrature(self, t: float, s: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nodes u [n] in (t, s) and weights w [n] with int_t^s f(u) du ~ sum w f(u): Gauss-Legendre in
        log rho = -lambda, in which the exponential integrators' kernels are smooth (exact for DDIM's)."""
        sch = self.schedule
        v, wv = gl_rule(-float(sch.lam(t)), -float(sch.lam(s)), n)
        u = sch.t_of_lam(-v)
        return u, wv / (sch.d_log_sigma_dt(u) - sch.d_log_alpha_dt(u))           # du = dv / (dv/du)
