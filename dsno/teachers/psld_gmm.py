"""The exact score of a diagonal Gaussian mixture under PSLD, in the augmented space z = (x, m).

Data x0 ~ sum_k w_k N(mu_k, diag(v_k)), momentum m0 ~ N(0, kappa M) independent, every pixel on
its own. PSLD is linear, so per pixel and component z_t | k ~ N(Phi (mu, 0), S_k) with the 2x2
S_k = Phi diag(v_k, kappa M) Phi^T + Q, (Phi, Q) = process.transition(0, t): the marginal is a
Gaussian mixture and its score is closed form (2x2 inverses per pixel, responsibilities over k).

The state layout, the prior and the eps parameterisation (score = -L_t^-T eps) are every PSLD
teacher's (`dsno.teachers.psld_teacher`). Everything in float64.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from dsno.checks import fail, finite
from dsno.processes.psld import PSLD
from dsno.schedules import ProcessError
from dsno.schema import doc_field
from dsno.teachers.base import batch_times
from dsno.teachers.gmm import register_mixture
from dsno.teachers.mnist_gmm import DigitMixtureConfig, load_mnist_gmm
from dsno.teachers.psld_teacher import PSLDTeacher
from dsno.teachers.registry import register_teacher


class PSLDGaussianMixture(PSLDTeacher):
    """means: [K, C, ...]; variances: [K, C, ...] or [K]; weights: [K] (normalised); process: PSLD.

    score(z, t), eps(z, t), x0(z, t) (E[x0 | z_t]), log_prob(z, t); z: [B, 2C, ...], t: scalar or [B].
    """

    exact = True                    # the Teacher capabilities (dsno.teachers.base.Teacher) it has
    network = None
    backbone_config = None
    solve_dtype = torch.float64

    def __init__(self, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor | None = None,
                 process: PSLD | None = None, name: str = "psld_gmm"):
        super().__init__()
        self.process = process if process is not None else PSLD()
        register_mixture(self, means, variances, weights, name)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def fingerprint(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for b in (self.means, self.variances, self.log_weights):
            h.update(b.detach().cpu().numpy().tobytes())
        return {"class": type(self).__name__, "prediction": self.prediction, "process": self.process.to_dict(),
                "name": self.name, "components": self.num_components, "shape": list(self.shape),
                "params_sha256": h.hexdigest()[:16]}

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
        """(log p_t per row [B], r [B, K], and the precision entries E, Cc, A [K, D] of each 2x2
        covariance [[a, c], [c, e]]: its inverse is [[E, -Cc], [-Cc, A]]) for rows at one time. The
        quadratic forms are matrix products [B, D] x [D, K], never [B, K, D] temporaries."""
        mx, mm, a, c, e, _ = stats
        det = a * e - c**2
        ea, ca, aa = e / det, c / det, a / det
        quad = ((x * x) @ ea.T - 2 * x @ (ea * mx).T + (ea * mx * mx).sum(1)
                - 2 * ((x * m) @ ca.T - x @ (ca * mm).T - m @ (ca * mx).T + (ca * mx * mm).sum(1))
                + (m * m) @ aa.T - 2 * m @ (aa * mm).T + (aa * mm * mm).sum(1))
        lp = -0.5 * (quad + torch.log(det).sum(1) + 2 * x.shape[1] * math.log(2 * math.pi)) + self.log_weights
        log_p = torch.logsumexp(lp, dim=1)
        return log_p, torch.exp(lp - log_p[:, None]), ea, ca, aa

    # the teacher ------------------------------------------------------------------------
    def score(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        """grad_z log p_t(z): [B, 2C, ...] float64."""
        def fn(x, m, tu):
            stats = self._stats(tu)
            mx, mm = stats[:2]
            _, r, ea, ca, aa = self._responsibilities(x, m, stats)
            sx = -(x * (r @ ea) - r @ (ea * mx) - m * (r @ ca) + r @ (ca * mm))
            sm = -(m * (r @ aa) - r @ (aa * mm) - x * (r @ ca) + r @ (ca * mx))
            return sx, sm
        return self.join(*self._per_time(z, t, fn))

    def eps(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        """The network target eps = -L_t^T score (so score = -L_t^-T eps): [B, 2C, ...] float64."""
        return self.eps_from_score(self.score(z, t), t)

    def x0(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        """E[x0 | z_t]: [B, C, ...] float64 (cov(x0, z_t | k) = v (Phi_xx, Phi_mx) per pixel, so the
        posterior mean of component k is mu + gx (E dx - Cc dm) + gm (A dm - Cc dx))."""
        def fn(x, m, tu):
            stats = self._stats(tu)
            mx, mm, phi = stats[0], stats[1], stats[5]
            _, r, ea, ca, aa = self._responsibilities(x, m, stats)
            gx, gm = self.variances * phi[0, 0], self.variances * phi[1, 0]      # [K, D]
            px, pm = gx * ea - gm * ca, gm * aa - gx * ca                        # the weights of dx and dm
            return (r @ self.means + x * (r @ px) - r @ (px * mx) + m * (r @ pm) - r @ (pm * mm),)
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


@dataclass
class PSLDMnistGMMConfig(DigitMixtureConfig):
    """teacher=psld_mnist_gmm: the shipped MNIST digit mixture (the mnist_gmm fit) under PSLD, exact."""

    kind: str = "psld_mnist_gmm"
    beta_min: float = doc_field(8.0, "PSLD's beta at t = 0 (the defaults are PSLD's CIFAR-10 settings)")
    beta_max: float = doc_field(8.0, "PSLD's beta at t = 1")
    nu: float = doc_field(4.01, "PSLD's nu: the momentum channel's friction")
    gamma: float = doc_field(0.01, "PSLD's gamma: the data channel's friction and noise (0: noise on m only)")
    m_inv: Optional[float] = doc_field(None, "M^-1; null: critical damping (gamma - nu)^2 / 4")
    kappa: float = doc_field(0.04, "initial momentum variance kappa M")

    process: ClassVar[str] = "augmented"

    def __post_init__(self) -> None:
        self.check_mixture_keys()
        for key in ("beta_min", "beta_max", "nu", "gamma", "kappa", *(("m_inv",) if self.m_inv is not None else ())):
            finite(f"teacher.{key}", getattr(self, key))
        try:
            self.psld()
        except ProcessError as e:        # name the first parameter the process's message mentions
            keys = ("beta_min", "beta_max", "m_inv", "gamma", "kappa", "nu")
            key = next((k for k in keys if re.search(rf"\b{k}\b", str(e))), "beta_min")
            fail(f"teacher.{key}", getattr(self, key), str(e))

    def psld(self) -> PSLD:
        return PSLD(self.beta_min, self.beta_max, self.nu, self.gamma, m_inv=self.m_inv, kappa=self.kappa)

    def fixed_schedule(self):
        return self.psld()


@register_teacher("psld_mnist_gmm", PSLDMnistGMMConfig, digits=True)
def load_config(c: PSLDMnistGMMConfig) -> PSLDGaussianMixture:
    mix = load_mnist_gmm(c.size, c.components, path=c.path)
    return PSLDGaussianMixture(mix.means.reshape(-1, *mix.shape), mix.variances.reshape(-1, *mix.shape),
                               mix.log_weights.exp(), process=c.psld(), name=f"psld_{mix.name}")
