"""Scalar linear diffusions x_t = alpha_t x_0 + sigma_t eps, in float64.

q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), lambda_t = log(alpha_t / sigma_t) (half log-SNR).
Time t is continuous, in [t_min, T].

- `VPSchedule` (variance preserving): sigma_t^2 = 1 - alpha_t^2 (linear, cosine, discrete DDPM);
- `VESchedule` (variance exploding, EDM): alpha_t = 1, sigma_t = t, t in [sigma_min, sigma_max];
- `FlowSchedule` (rectified flow / flow matching): alpha_t = 1 - t, sigma_t = t.

All of them share one interface (alpha, sigma, lam, t_of_lam, alpha_sigma_of_lam,
d_log_alpha_dt, d_log_sigma_dt, T, t_min, to_dict); `schedule_from_dict` rebuilds any of them.

Every method takes a Python float, a NumPy array or a tensor and returns a float64 tensor
of the same shape. Callers cast to their working dtype.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from dsno.errors import UserError


class ProcessError(UserError):
    """A diffusion process was given parameters it cannot have (the message names them)."""


def _f64(t: Any) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(t, dtype=np.float64))


def _log_alpha_to_lam(log_alpha: torch.Tensor) -> torch.Tensor:
    # lambda = log alpha - log sigma, log sigma = 0.5 log(1 - alpha^2)
    return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _lam_to_log_alpha(lam: torch.Tensor) -> torch.Tensor:
    # alpha^2 = 1 / (1 + exp(-2 lambda))
    return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class _TimeRange:
    """What every scalar schedule derives from t_of_lam, t_min and T."""

    def t_of_sigma_over_alpha(self, rho: Any) -> torch.Tensor:
        """Inverse of rho_t = sigma_t / alpha_t = exp(-lambda_t) (the EDM sigma)."""
        return self.t_of_lam(-torch.log(_f64(rho)))

    def check_times(self, t: Any, name: str = "t") -> None:
        """Raise ProcessError (a ValueError) if any time lies outside [t_min, T] of this schedule."""
        t = _f64(t)
        lo, hi = float(t.min()), float(t.max())
        if not (torch.isfinite(t).all() and lo >= self.t_min - 1e-12 and hi <= self.T + 1e-12):
            raise ProcessError(f"{name} must lie in [{self.t_min:g}, {self.T:g}] for {self!r}; got [{lo:g}, {hi:g}]")


class VPSchedule(_TimeRange):
    """A variance-preserving schedule: `linear`, `cosine` or `discrete` (from DDPM betas).

    Use the constructors; `kind` and `params` fully describe the schedule (see `to_dict`).
    """

    def __init__(self, kind: str, params: dict[str, Any]):
        self.kind = kind
        self.params = dict(params)
        if kind == "linear":
            b0, b1 = float(params["beta_min"]), float(params["beta_max"])
            if not (0.0 < b0 < b1):
                raise ValueError(f"linear schedule needs 0 < beta_min < beta_max, got {b0}, {b1}")
            self.T, self.t_min = 1.0, 1e-5
        elif kind == "cosine":
            s = float(params["s"])
            self.T = float(params.get("T", 0.9946))
            self.t_min = 1e-5
            self._log_alpha_0 = math.log(math.cos(math.pi / 2 * s / (1 + s)))
        elif kind == "discrete":
            betas = np.asarray(params["betas"], dtype=np.float64)
            if betas.ndim != 1 or len(betas) < 2 or np.any(betas <= 0) or np.any(betas >= 1):
                raise ValueError("discrete schedule needs a 1-D array of betas in (0, 1)")
            n = len(betas)
            self.num_steps = n
            self._t_grid = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)[1:]
            self._log_alpha_grid = torch.from_numpy(0.5 * np.cumsum(np.log1p(-betas)))
            self.T, self.t_min = 1.0, 1.0 / n
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; use linear, cosine or discrete")

    # constructors -----------------------------------------------------------------
    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0) -> "VPSchedule":
        """log alpha_t = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2, t in [0, 1]."""
        return cls("linear", {"beta_min": beta_min, "beta_max": beta_max})

    @classmethod
    def cosine(cls, s: float = 0.008, T: float = 0.9946) -> "VPSchedule":
        """alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) pi / 2)."""
        return cls("cosine", {"s": s, "T": T})

    @classmethod
    def discrete(cls, betas: Sequence[float] | np.ndarray | torch.Tensor) -> "VPSchedule":
        """DDPM betas; step i (0-based) sits at t = (i + 1) / N, log alpha interpolated linearly."""
        b = betas.detach().cpu().numpy() if isinstance(betas, torch.Tensor) else np.asarray(betas)
        return cls("discrete", {"betas": b.astype(np.float64).tolist()})

    @classmethod
    def ddpm_linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """The DDPM discrete linear betas (1e-4 .. 0.02 over 1000 steps)."""
        return cls.discrete(np.linspace(beta_start, beta_end, num_steps))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VPSchedule":
        d = dict(d)
        return cls(d.pop("kind"), d)

    def __repr__(self) -> str:
        if self.kind == "discrete":
            return f"VPSchedule.discrete(N={self.num_steps})"
        return f"VPSchedule.{self.kind}({', '.join(f'{k}={v}' for k, v in self.params.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VPSchedule) and self.to_dict() == other.to_dict()

    # marginals --------------------------------------------------------------------
    def log_alpha(self, t: Any) -> torch.Tensor:
        t = _f64(t)
        if self.kind == "linear":
            b0, b1 = self.params["beta_min"], self.params["beta_max"]
            return -0.25 * (b1 - b0) * t**2 - 0.5 * b0 * t
        if self.kind == "cosine":
            s = self.params["s"]
            return torch.log(torch.cos(math.pi / 2 * (t + s) / (1 + s))) - self._log_alpha_0
        return _interp(t, self._t_grid, self._log_alpha_grid)

    def alpha(self, t: Any) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Any) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t: Any) -> torch.Tensor:
        """Half log-SNR, log(alpha_t / sigma_t)."""
        return _log_alpha_to_lam(self.log_alpha(t))

    def snr(self, t: Any) -> torch.Tensor:
        return torch.exp(2.0 * self.lam(t))

    def d_log_alpha_dt(self, t: Any) -> torch.Tensor:
        """d log alpha / dt = -beta(t) / 2."""
        t = _f64(t)
        if self.kind == "linear":
            b0, b1 = self.params["beta_min"], self.params["beta_max"]
            return -0.5 * (b1 - b0) * t - 0.5 * b0
        if self.kind == "cosine":
            s = self.params["s"]
            return -torch.tan(math.pi / 2 * (t + s) / (1 + s)) * math.pi / (2 * (1 + s))
        idx = torch.clamp(torch.searchsorted(self._t_grid, t.contiguous()), 1, len(self._t_grid) - 1)
        tg, lg = self._t_grid, self._log_alpha_grid
        return (lg[idx] - lg[idx - 1]) / (tg[idx] - tg[idx - 1])

    def beta(self, t: Any) -> torch.Tensor:
        """The SDE's beta(t) = -2 d log alpha / dt."""
        return -2.0 * self.d_log_alpha_dt(t)

    def d_log_sigma_dt(self, t: Any) -> torch.Tensor:
        """d log sigma / dt = -(alpha / sigma)^2 d log alpha / dt (from sigma^2 = 1 - alpha^2)."""
        return -self.snr(t) * self.d_log_alpha_dt(t)

    def alpha_sigma_of_lam(self, lam: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) at half log-SNR lam, from lam alone: alpha^2 = sigmoid(2 lam)."""
        lam = _f64(lam)
        return _lam_to_log_alpha(lam).exp(), _lam_to_log_alpha(-lam).exp()

    def t_of_lam(self, lam: Any) -> torch.Tensor:
        """Inverse of `lam`: the time whose half log-SNR is `lam`."""
        lam = _f64(lam)
        log_alpha = _lam_to_log_alpha(lam)
        if self.kind == "linear":
            b0, b1 = self.params["beta_min"], self.params["beta_max"]
            c = -log_alpha
            return 2.0 * c / (0.5 * b0 + torch.sqrt(0.25 * b0**2 + (b1 - b0) * c))
        if self.kind == "cosine":
            s = self.params["s"]
            return 2.0 * (1 + s) / math.pi * torch.arccos(torch.exp(log_alpha + self._log_alpha_0)) - s
        # log alpha is piecewise linear in t and decreasing: invert it cell by cell, exactly
        return _interp(log_alpha, torch.flip(self._log_alpha_grid, [0]), torch.flip(self._t_grid, [0]))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation with linear extrapolation at both ends (float64)."""
    flat = x.reshape(-1).contiguous()
    idx = torch.clamp(torch.searchsorted(xp, flat), 1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    out = f0 + (f1 - f0) * (flat - x0) / (x1 - x0)
    return out.reshape(x.shape)


class _Closed(_TimeRange):
    """What VESchedule and FlowSchedule share: parameters, equality, time checks (float64)."""

    kind: str
    params: dict[str, Any]
    T: float
    t_min: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.params.items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))

    def log_alpha(self, t: Any) -> torch.Tensor:
        return torch.log(self.alpha(t))

    def snr(self, t: Any) -> torch.Tensor:
        return torch.exp(2.0 * self.lam(t))



def _positive_finite(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ProcessError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


class VESchedule(_Closed):
    """Variance exploding in the EDM convention: alpha_t = 1, sigma_t = t, t in [sigma_min, sigma_max].

    lambda = -log t; the time a model takes is its noise level sigma.
    """

    kind = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        lo, hi = _positive_finite("sigma_min", sigma_min), _positive_finite("sigma_max", sigma_max)
        if not lo < hi:
            raise ProcessError(f"VESchedule needs sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
        self.params = {"sigma_min": lo, "sigma_max": hi}
        self.t_min, self.T = lo, hi

    def alpha(self, t: Any) -> torch.Tensor:
        return torch.ones_like(_f64(t))

    def sigma(self, t: Any) -> torch.Tensor:
        return _f64(t).clone()

    def lam(self, t: Any) -> torch.Tensor:
        return -torch.log(_f64(t))

    def t_of_lam(self, lam: Any) -> torch.Tensor:
        return torch.exp(-_f64(lam))

    def alpha_sigma_of_lam(self, lam: Any) -> tuple[torch.Tensor, torch.Tensor]:
        lam = _f64(lam)
        return torch.ones_like(lam), torch.exp(-lam)

    def d_log_alpha_dt(self, t: Any) -> torch.Tensor:
        return torch.zeros_like(_f64(t))

    def d_log_sigma_dt(self, t: Any) -> torch.Tensor:
        return 1.0 / _f64(t)

    def check_model_times(self, t: torch.Tensor) -> None:
        """A VE model is defined at every noise level sigma = t > 0."""
        if not bool((torch.isfinite(t) & (t > 0)).all()):
            raise ProcessError(f"a VE teacher takes noise levels t = sigma > 0; got t in [{float(t.min()):g}, "
                               f"{float(t.max()):g}]")


class FlowSchedule(_Closed):
    """Rectified flow / flow matching: alpha_t = 1 - t, sigma_t = t, t in [1e-5, T], T < 1.

    lambda = log((1 - t) / t), t = sigmoid(-lambda). Pure noise is t = 1, where lambda = -inf;
    the solvers start at T (default 0.999, lambda = -6.9).
    """

    kind = "flow"

    def __init__(self, T: float = 0.999):
        T = _positive_finite("T", T)
        if not 1e-5 < T < 1.0:
            raise ProcessError(f"FlowSchedule needs 1e-5 < T < 1 (at t = 1 the data weight 1 - t is 0), got T={T!r}")
        self.params = {"T": T}
        self.t_min, self.T = 1e-5, T

    def alpha(self, t: Any) -> torch.Tensor:
        return 1.0 - _f64(t)

    def sigma(self, t: Any) -> torch.Tensor:
        return _f64(t).clone()

    def lam(self, t: Any) -> torch.Tensor:
        t = _f64(t)
        return torch.log1p(-t) - torch.log(t)

    def t_of_lam(self, lam: Any) -> torch.Tensor:
        return torch.sigmoid(-_f64(lam))

    def alpha_sigma_of_lam(self, lam: Any) -> tuple[torch.Tensor, torch.Tensor]:
        lam = _f64(lam)
        return torch.sigmoid(lam), torch.sigmoid(-lam)

    def d_log_alpha_dt(self, t: Any) -> torch.Tensor:
        return -1.0 / (1.0 - _f64(t))

    def d_log_sigma_dt(self, t: Any) -> torch.Tensor:
        return 1.0 / _f64(t)

    def check_model_times(self, t: torch.Tensor) -> None:
        """A flow model is defined for t in [0, 1) (t = 1 is pure noise, t > 1 or < 0 means nothing)."""
        if not bool((torch.isfinite(t) & (t >= 0) & (t < 1)).all()):
            raise ProcessError(f"a flow-matching teacher takes t in [0, 1) (x_t = (1 - t) x0 + t eps); got t in "
                               f"[{float(t.min()):g}, {float(t.max()):g}] (VP times or t = 1?)")


Schedule = VPSchedule | VESchedule | FlowSchedule


def schedule_from_dict(d: dict[str, Any]) -> Schedule:
    """Rebuild any scalar schedule from its `to_dict()`."""
    d = dict(d)
    kind = d.get("kind")
    if kind == "ve":
        d.pop("kind")
        return VESchedule(**d)
    if kind == "flow":
        d.pop("kind")
        return FlowSchedule(**d)
    return VPSchedule.from_dict(d)
