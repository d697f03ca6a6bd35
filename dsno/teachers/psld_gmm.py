"""The exact score of a diagonal Gaussian mixture under PSLD, in the augmented space z = (x, m).

Data x0 ~ sum_k w_k N(mu_k, diag(v_k)), momentum m0 ~ N(0, kappa M) independent, every pixel on
its own. PSLD is linear, so per pixel and component z_t | k ~ N(Phi (mu, 0), S_k) with the 2x2
S_k = Phi diag(v_k, kappa M) Phi^T + Q, (Phi, Q) = process.transition(0, t): the marginal is a
Gaussian mixture and its score is closed form (2x2 inverses per pixel, responsibilities over k).

Layout: data of shape [C, ...] give states z: [B, 2C, ...], x = z[:, :C] then m = z[:, C:]
(CIFAR-10: 6 channels). The network parameterisation: with L_t the Cholesky factor of the
perturbation kernel S_t = Phi diag(0, kappa M) Phi^T + Q (of z_t given x0), score = -L_t^-T eps.
Everything in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsno.processes.psld import PSLD
from dsno.teachers.base import batch_times
from dsno.teachers.gmm import register_mixture


class PSLDGaussianMixture(torch.nn.Module):
    """means: [K, C, ...]; variances: [K, C, ...] or [K]; weights: [K] (normalised); process: PSLD.

    score(z, t), eps(z, t), x0(z, t) (E[x0 | z_t]), log_prob(z, t); z: [B, 2C, ...], t: scalar or [B].
    """

    prediction = "eps"
    augmented = True

    def __init__(self, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor | None = None,
                 process: PSLD | None = None, name: str = "psld_gmm"):
        super().__init__()
        self.process = process if process is not None else PSLD()
        register_mixture(self, means, variances, weights, name)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def state_shape(self) -> tuple[int, ...]:
        """The shape of one state z: (2C, ...)."""
        return (2 * self.shape[0], *self.shape[1:])

    # layout ---------------------------------------------------------------------------
    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, 2C, ...] -> (x, m), each [B, D] float64 (D = C * ...)."""
        if tuple(z.shape[1:]) != self.state_shape:
            raise ValueError(f"z must be [B, {', '.join(map(str, self.state_shape))}] (x then m), got "
                             f"{tuple(z.shape)}")
        c = self.shape[0]
        zf = z.to(torch.float64)
        return zf[:, :c].reshape(z.shape[0], -1), zf[:, c:].reshape(z.shape[0], -1)

    def join(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """(x, m) [B, D] -> z [B, 2C, ...]."""
        b = x.shape[0]
        return torch.cat([x.reshape(b, *self.shape), m.reshape(b, *self.shape)], dim=1)

    # marginal statistics at one time ----------------------------------------------------
    def _stats(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per component and pixel at time t (0-dim): means (mx, mm) and covariance entries
        (a, c, e) of [[a, c], [c, e]], each [K, D]."""
        phi, q = self.process.transition(0.0, t)
        km = self.process.kappa * self.process.M
        v = self.variances
        a = phi[0, 0] ** 2 * v + phi[0, 1] ** 2 * km + q[0, 0]
        c = phi[0, 0] * phi[1, 0] * v + phi[0, 1] * phi[1, 1] * km + q[0, 1]
        e = phi[1, 0] ** 2 * v + phi[1, 1] ** 2 * km + q[1, 1]
        return phi[0, 0] * self.means, phi[1, 0] * self.means, a, c, e, phi

    def _per_time(self, z: torch.Tensor, t: Any, fn) -> list[torch.Tensor]:
        """fn(x, m, t) -> tensors with one row per state, for the rows sharing each time, stacked."""
        x, m = self.split(z)
        tb = batch_times(t, z).to("cpu")
        outs: list[torch.Tensor] | None = None
        for tu in torch.unique(tb):
            rows = tb == tu
            got = fn(x[rows], m[rows], tu)
            if outs is None:
                outs = [torch.empty(len(x), *g.shape[1:], dtype=torch.float64) for g in got]
            for o, g in zip(outs, got):
                o[rows] = g
        return outs

    def _responsibilities(self, x, m, stats) -> tuple[torch.Tensor, ...]:
        """(log p_t per row [B], r [B, K], dx, dm [B, K, D]) for rows at one time."""
        mx, mm, a, c, e, _ = stats
        det = a * e - c**2
        dx, dm = x[:, None] - mx[None], m[:, None] - mm[None]
        quad = (e * dx**2 - 2 * c * dx * dm + a * dm**2) / det
        lp = -0.5 * (quad + torch.log(det) + 2 * math.log(2 * math.pi)).sum(-1) + self.log_weights
        log_p = torch.logsumexp(lp, dim=1)
        return log_p, torch.exp(lp - log_p[:, None]), dx, dm

    # the teacher ------------------------------------------------------------------------
    def score(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        """grad_z log p_t(z): [B, 2C, ...] float64."""
        def fn(x, m, tu):
            stats = self._stats(tu)
            _, r, dx, dm = self._responsibilities(x, m, stats)
            a, c, e = stats[2:5]
            det = a * e - c**2
            sx = -(r[..., None] * (e * dx - c * dm) / det).sum(1)
            sm = -(r[..., None] * (a * dm - c * dx) / det).sum(1)
            return sx, sm
        return self.join(*self._per_time(z, t, fn))

    def kernel_cholesky(self, t: Any) -> torch.Tensor:
        """L_t [..., 2, 2]: the Cholesky factor of the perturbation kernel covariance of z_t given x0."""
        return self.process.kernel_cholesky(torch.as_tensor(t, dtype=torch.float64).cpu())

    def eps(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        """The network target eps = -L_t^T score (so score = -L_t^-T eps): [B, 2C, ...] float64."""
        s = self.score(z, t)
        tb = batch_times(t, z).to("cpu")
        lt = self.kernel_cholesky(tb)                                   # [B, 2, 2]
        c = self.shape[0]
        bshape = (-1, *([1] * (z.ndim - 1)))
        sx, sm = s[:, :c], s[:, c:]
        ex = -(lt[:, 0, 0].reshape(bshape) * sx + lt[:, 1, 0].reshape(bshape) * sm)
        em = -(lt[:, 1, 1].reshape(bshape) * sm)
        return torch.cat([ex, em], dim=1)

    def score_from_eps(self, eps: torch.Tensor, t: Any) -> torch.Tensor:
        """score = -L_t^-T eps: [B, 2C, ...] float64 (what a PSLD network's output means)."""
        tb = batch_times(t, eps).to("cpu")
        lt = self.kernel_cholesky(tb)
        c = self.shape[0]
        bshape = (-1, *([1] * (eps.ndim - 1)))
        e = eps.to(torch.float64)
        sm = -e[:, c:] / lt[:, 1, 1].reshape(bshape)
        sx = -(e[:, :c] + lt[:, 1, 0].reshape(bshape) * sm) / lt[:, 0, 0].reshape(bshape)
        return torch.cat([sx, sm], dim=1)

    def x0(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        """E[x0 | z_t]: [B, C, ...] float64 (cov(x0, z_t | k) = v (Phi_xx, Phi_mx) per pixel)."""
        def fn(x, m, tu):
            stats = self._stats(tu)
            _, r, dx, dm = self._responsibilities(x, m, stats)
            a, c, e, phi = stats[2:]
            det = a * e - c**2
            gx, gm = self.variances * phi[0, 0], self.variances * phi[1, 0]      # [K, D]
            wx, wm = (e * dx - c * dm) / det, (a * dm - c * dx) / det
            post = self.means[None] + gx * wx + gm * wm
            return ((r[..., None] * post).sum(1),)
        (x0,) = self._per_time(z, t, fn)
        return x0.reshape(z.shape[0], *self.shape)

    def log_prob(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        """log p_t(z): [B] float64."""
        (lp,) = self._per_time(z, t, lambda x, m, tu: self._responsibilities(x, m, self._stats(tu))[:1])
        return lp

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of z0 = (x0, m0), m0 ~ N(0, kappa M): [n, 2C, ...] float64."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        d = self.means.shape[1]
        x = self.means[k] + self.variances[k].sqrt() * torch.randn(n, d, generator=generator, dtype=torch.float64)
        m = math.sqrt(self.process.kappa * self.process.M) * torch.randn(n, d, generator=generator,
                                                                          dtype=torch.float64)
        return self.join(x, m)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The 6-channel-style network output: eps(z, t)."""
        return self.eps(z, t)
