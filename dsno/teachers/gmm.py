"""The exact denoiser of a diagonal-covariance Gaussian mixture under any scalar linear diffusion
x_t = alpha_t x0 + sigma_t eps (VPSchedule, VESchedule, FlowSchedule: alpha, sigma general).

Data x0 ~ sum_k w_k N(mu_k, diag(v_k)). Then x_t | k ~ N(alpha mu_k, diag(alpha^2 v_k + sigma^2)),
and E[x0 | x_t] = sum_k r_k(x_t) [mu_k + alpha v_k / s_k^2 (x_t - alpha mu_k)] in closed form.
Computed in float64 whatever the input dtype.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from dsno.checks import existing_path, fail
from dsno.nn.config import ConfigError
from dsno.schedules import Schedule, VPSchedule
from dsno.schema import doc_field
from dsno.teachers.base import Teacher, batch_times
from dsno.teachers.config import ScheduleConfig, TeacherConfig, build_schedule
from dsno.teachers.registry import register_teacher
from dsno.trust.tensor_file import load_float_tensors


def register_mixture(module: torch.nn.Module, means: torch.Tensor, variances: torch.Tensor,
                     weights: torch.Tensor | None, name: str) -> None:
    """Check a mixture's parameters and store them on `module` as float64 buffers: means and
    variances [K, D] (flattened), log_weights [K] (normalised); also module.shape and .name.

    means: [K, *shape]; variances: [K, *shape] or [K] (isotropic); weights: [K] or None (equal)."""
    means = torch.as_tensor(means, dtype=torch.float64)
    if means.ndim < 2:
        raise ValueError(f"means must be [K, *shape], got shape {tuple(means.shape)}")
    k = means.shape[0]
    variances = torch.as_tensor(variances, dtype=torch.float64)
    if variances.shape == (k,):
        variances = variances.reshape(k, *([1] * (means.ndim - 1))).expand_as(means)
    if variances.shape != means.shape:
        raise ValueError(f"variances must be [K] or {tuple(means.shape)}, got {tuple(variances.shape)}")
    if not bool((variances > 0).all()):
        raise ValueError("all variances must be positive")
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (k,) or not bool((weights > 0).all()):
        raise ValueError(f"weights must be {k} positive numbers")
    module.shape = tuple(means.shape[1:])
    module.name = name
    module.register_buffer("means", means.reshape(k, -1).contiguous())
    module.register_buffer("variances", variances.reshape(k, -1).contiguous())
    module.register_buffer("log_weights", torch.log(weights / weights.sum()))


class GaussianMixture(Teacher):
    """means: [K, *shape]; variances: [K, *shape] or [K] (isotropic) ; weights: [K] (normalised here);
    schedule: any scalar schedule (default VPSchedule.linear())."""

    prediction = "x0"
    exact = True

    def __init__(self, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor | None = None,
                 schedule: Schedule | None = None, name: str = "gmm"):
        super().__init__()
        self.schedule = schedule if schedule is not None else VPSchedule.linear()
        register_mixture(self, means, variances, weights, name)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def data_mean(self) -> torch.Tensor:
        """sum_k w_k mu_k: [*shape], float64."""
        return (self.log_weights.exp() @ self.means).reshape(self.shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t = x]; x: [B, *shape], t: [B] float64."""
        return self.denoise(x, t)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t = x] under the mixture, or per row under its own component log-weights
        log_weights [B, K] (-inf leaves a component out: a sub-mixture per row). x: [B, *shape],
        t: [B] float64. Rows sharing a time share the work."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        t = t.to(xf.device)
        out = torch.empty_like(xf)
        for tu in torch.unique(t):
            rows = t == tu
            out[rows] = self._posterior_mean(xf[rows], tu, None if log_weights is None else log_weights[rows])
        return out.reshape(x.shape).to(x.dtype)

    def _posterior_mean(self, xf: torch.Tensor, t: torch.Tensor, log_weights: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """xf: [B, D] float64 at one time t (0-dim) -> E[x0 | x_t]: [B, D]; log_weights: [B, K] or
        None (the mixture's own)."""
        alpha = self.schedule.alpha(t).to(xf.device)
        sigma2 = self.schedule.sigma(t).to(xf.device) ** 2
        mu, var = self.means, self.variances                          # [K, D]
        inv = 1.0 / (alpha**2 * var + sigma2)                         # [K, D]
        # log N(x; alpha mu_k, 1/inv_k), expanded into matrix products
        quad = (xf**2) @ inv.T - 2.0 * alpha * xf @ (mu * inv).T + (alpha**2 * mu**2 * inv).sum(-1)
        log_w = self.log_weights if log_weights is None else log_weights
        r = torch.softmax(log_w - 0.5 * (quad - torch.log(inv).sum(-1)), dim=1)  # [B, K]
        gain = alpha * var * inv                                      # [K, D]
        return r @ (mu - alpha * gain * mu) + (r @ gain) * xf

    def score(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """grad log p_t(x) = -eps / sigma."""
        tb = batch_times(t, x)
        s = self.schedule.sigma(tb).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return -self.eps(x, tb) / s

    def log_prob(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """log p_t(x) of the noised mixture, [B] float64 (for autograd checks)."""
        tb = batch_times(t, x)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        alpha = self.schedule.alpha(tb)[:, None, None]
        s2 = alpha**2 * self.variances[None] + (self.schedule.sigma(tb) ** 2)[:, None, None]
        d = xf[:, None, :] - alpha * self.means[None]
        lp = -0.5 * ((d**2 / s2).sum(-1) + torch.log(s2).sum(-1) + xf.shape[1] * math.log(2 * math.pi))
        return torch.logsumexp(self.log_weights[None] + lp, dim=1)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x0 from the mixture, [n, *shape] float64."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return (self.means[k] + self.variances[k].sqrt() * z).reshape(n, *self.shape)

    def ode_solution(self, x_s: torch.Tensor, s: float, t: float) -> torch.Tensor:
        """Exact probability-flow ODE map from time s to time t (single Gaussian, K = 1 only).

        x_t = alpha_t m + (st_t / st_s) (x_s - alpha_s m), st^2 = alpha^2 v + sigma^2, per dimension,
        for any scalar process (in y = x / alpha, rho = sigma / alpha the flow is the VE one).
        """
        if self.num_components != 1:
            raise ValueError("the closed-form ODE solution exists for a single Gaussian (K = 1) only")
        m, v = self.means[0], self.variances[0]
        a_s, a_t = self.schedule.alpha(s), self.schedule.alpha(t)
        st_s = torch.sqrt(a_s**2 * v + self.schedule.sigma(s) ** 2)
        st_t = torch.sqrt(a_t**2 * v + self.schedule.sigma(t) ** 2)
        xf = x_s.reshape(x_s.shape[0], -1).to(torch.float64)
        out = a_t * m + (st_t / st_s) * (xf - a_s * m)
        return out.reshape(x_s.shape).to(x_s.dtype)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        h = hashlib.sha256()
        for b in (self.means, self.variances, self.log_weights):
            h.update(b.detach().cpu().numpy().tobytes())
        fp.update(name=self.name, components=self.num_components, shape=list(self.shape),
                  params_sha256=h.hexdigest()[:16])
        return fp


@dataclass
class GMMFileConfig(TeacherConfig):
    """teacher=gmm_file: an exact mixture from a safetensors file with means [K, ...], variances
    [K, ...] (or [K]) and weights [K]."""

    kind: str = "gmm_file"
    path: Optional[str] = doc_field(None, "the mixture's safetensors file (required)")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        if self.path is None:
            fail("teacher.path", None, "teacher=gmm_file needs teacher.path=FILE")
        existing_path("teacher.path", self.path, "the mixture's safetensors file")
        self.schedule.check("teacher.schedule")

    def fixed_schedule(self):
        return build_schedule(self.schedule)


@register_teacher("gmm_file", GMMFileConfig)
def load_config(c: GMMFileConfig) -> GaussianMixture:
    p = Path(c.path)
    t = load_float_tensors(p, ("means", "variances", "weights"), ConfigError, "a mixture file holds float tensors")
    missing = {"means", "variances", "weights"} - set(t)
    if missing:
        raise ValueError(f"mixture file {p} lacks tensors {sorted(missing)}; it needs means [K,...], "
                         "variances [K,...] and weights [K]")
    return GaussianMixture(t["means"], t["variances"], t["weights"], schedule=build_schedule(c.schedule), name=p.stem)
