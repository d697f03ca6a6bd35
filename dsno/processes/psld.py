"""Phase Space Langevin Diffusion (PSLD, Pandey & Mandt 2023): data x plus momentum m, per pixel.

Forward SDE of z = (x, m), one pixel, t in [0, 1]:

    dx = beta/2 (M^-1 m - gamma x) dt + sqrt(beta gamma) dW_x
    dm = beta/2 (-x - nu m) dt       + sqrt(beta M nu) dW_m

i.e. dz = beta(t) F z dt + sqrt(beta(t)) G dW with F = 1/2 [[-gamma, M^-1], [-1, -nu]] and
D = G G^T = diag(gamma, M nu); beta(t) = beta_min + t (beta_max - beta_min). Since F is constant,
with b = B(t) - B(s), B(t) = int_0^t beta:

    Phi(s, t) = expm(F b)                       (closed form for a 2x2 matrix)
    Q(s, t)   = int_0^b expm(F u) D expm(F u)^T du
              = Sigma_inf - Phi Sigma_inf Phi^T  (Lyapunov: F Sigma_inf + Sigma_inf F^T + D = 0)

Q takes the Lyapunov form for long steps and its Taylor series sum_n b^(n+1) / (n+1)! L^n(D),
L(X) = F X + X F^T, for short ones (2 |F| b <= 2), where the difference would cancel digits.

with the stationary law (the prior) Sigma_inf = diag(1, M). The data start with momentum
m_0 ~ N(0, kappa M) independent of x_0. Critical damping is M^-1 = (gamma - nu)^2 / 4 (the default).

gamma = 0: no noise and no friction on x; x moves only through m. That is the critically damped
Langevin diffusion of CLD (Dockhorn et al. 2022) with CLD's friction Gamma = nu M and its beta = beta / 2
(critical damping Gamma^2 = 4 M is then M^-1 = nu^2 / 4).

All math in float64; times are Python floats or tensors (any shape, broadcast).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dsno.processes.linear import gl_rule
from dsno.schedules import ProcessError


def _f64(t: Any) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(t, dtype=np.float64))


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProcessError(f"PSLD: {name} must be a finite number, got {v!r}")
    return float(v)


class PSLD:
    """PSLD(beta_min=8, beta_max=8, nu=4.01, gamma=0.01, m_inv=None, kappa=0.04); see the module doc.

    m_inv: M^-1 (default (gamma - nu)^2 / 4, critical damping); kappa: the initial momentum
    variance is kappa M. Refused (ProcessError, one line): beta_min or beta_max < 0, both 0,
    nu <= 0, gamma < 0, M^-1 <= 0, kappa < 0.
    """

    kind = "psld"
    k = 2                 # state components per pixel: (x, m)
    T = 1.0
    t_min = 1e-5

    def __init__(self, beta_min: float = 8.0, beta_max: float = 8.0, nu: float = 4.01, gamma: float = 0.01,
                 m_inv: float | None = None, kappa: float = 0.04):
        b0, b1 = _number("beta_min", beta_min), _number("beta_max", beta_max)
        nu, gamma, kappa = _number("nu", nu), _number("gamma", gamma), _number("kappa", kappa)
        if b0 < 0 or b1 < 0 or b0 + b1 == 0:
            raise ProcessError(f"PSLD needs beta_min >= 0 and beta_max >= 0, not both 0; got {beta_min!r}, "
                               f"{beta_max!r}")
        if nu <= 0:
            raise ProcessError(f"PSLD needs nu > 0 (the momentum friction), got nu={nu!r}")
        if gamma < 0:
            raise ProcessError(f"PSLD needs gamma >= 0 (the data friction; 0 is CLD), got gamma={gamma!r}")
        if kappa < 0:
            raise ProcessError(f"PSLD needs kappa >= 0 (initial momentum variance kappa M), got kappa={kappa!r}")
        m_inv = (gamma - nu) ** 2 / 4.0 if m_inv is None else _number("m_inv", m_inv)
        if m_inv <= 0:
            raise ProcessError(f"PSLD needs M^-1 > 0, got m_inv={m_inv!r}"
                               + (" ((gamma - nu)^2 / 4 with gamma = nu)" if gamma == nu else ""))
        self.params = {"beta_min": b0, "beta_max": b1, "nu": nu, "gamma": gamma, "m_inv": m_inv, "kappa": kappa}
        self.beta_min, self.beta_max, self.nu, self.gamma, self.m_inv, self.kappa = b0, b1, nu, gamma, m_inv, kappa
        self.M = 1.0 / m_inv

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PSLD":
        """`to_dict()` read back; ProcessError (one line) for a dict that is not a well-posed PSLD's."""
        if not isinstance(d, dict) or d.get("kind") != cls.kind:
            raise ProcessError(f"not a PSLD record (kind 'psld'): {d!r}")
        try:
            return cls(**{k: v for k, v in d.items() if k != "kind"})
        except TypeError as e:
            raise ProcessError(f"not a PSLD record ({e}): {d!r}") from None

    def __repr__(self) -> str:
        return f"PSLD({', '.join(f'{k}={v:g}' for k, v in self.params.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PSLD) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))

    # coefficients -------------------------------------------------------------------
    @property
    def F(self) -> torch.Tensor:
        """The drift matrix [2, 2] (dz = beta F z dt + ...)."""
        return 0.5 * torch.tensor([[-self.gamma, self.m_inv], [-1.0, -self.nu]], dtype=torch.float64)

    @property
    def D(self) -> torch.Tensor:
        """The diffusion matrix G G^T = diag(gamma, M nu) [2, 2]."""
        return torch.diag(torch.tensor([self.gamma, self.M * self.nu], dtype=torch.float64))

    def prior_cov(self) -> torch.Tensor:
        """The stationary covariance per pixel, diag(1, M) [2, 2]: x_T ~ N(0, 1), m_T ~ N(0, M)."""
        return torch.diag(torch.tensor([1.0, self.M], dtype=torch.float64))

    def initial_cov(self, var_x: Any = 0.0) -> torch.Tensor:
        """Covariance of z_0 = (x_0, m_0) for data variance var_x: diag(var_x, kappa M) [..., 2, 2]."""
        v = _f64(var_x)
        out = torch.zeros(*v.shape, 2, 2, dtype=torch.float64)
        out[..., 0, 0] = v
        out[..., 1, 1] = self.kappa * self.M
        return out

    def beta(self, t: Any) -> torch.Tensor:
        return self.beta_min + _f64(t) * (self.beta_max - self.beta_min)

    def B(self, t: Any) -> torch.Tensor:
        """int_0^t beta = beta_min t + t^2 (beta_max - beta_min) / 2."""
        t = _f64(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    # transition ---------------------------------------------------------------------
    def expm_F(self, b: Any) -> torch.Tensor:
        """expm(F b) [..., 2, 2] in closed form: e^tau (cosh(d) I + sinh(d) / d (F b - tau I)),
        tau = tr(F) b / 2, d^2 = b^2 ((gamma - nu)^2 / 4 - M^-1) / 4 (trigonometric when d^2 < 0;
        d = 0 at critical damping)."""
        b = _f64(b)
        tau = -(self.gamma + self.nu) / 4.0 * b
        d2 = b**2 * ((self.gamma - self.nu) ** 2 / 4.0 - self.m_inv) / 4.0
        r = torch.sqrt(d2.abs())
        pos = d2 >= 0
        ch = torch.where(pos, torch.cosh(r), torch.cos(r))
        safe = torch.where(r > 0, r, torch.ones_like(r))
        sh = torch.where(r > 0, torch.where(pos, torch.sinh(r), torch.sin(r)) / safe, torch.ones_like(r))
        n = self.F - 0.5 * torch.trace(self.F) * torch.eye(2, dtype=torch.float64)      # F - tr(F)/2 I
        e = torch.exp(tau)[..., None, None]
        return e * (ch[..., None, None] * torch.eye(2, dtype=torch.float64) + (sh * b)[..., None, None] * n)

    def lam(self, t: Any) -> torch.Tensor:
        """The data part's half log-SNR, log(Phi_xx / std(x_t | x_0)) with m_0 ~ N(0, kappa M): what
        time grids are spaced by and loss weights read (as a VP schedule's lam)."""
        phi, q = self.transition(0.0, _f64(t))
        return torch.log(phi[..., 0, 0].abs()) - 0.5 * torch.log(phi[..., 0, 1] ** 2 * self.kappa * self.M + q[..., 0, 0])

    def drift(self, t: Any) -> torch.Tensor:
        """beta(t) F [..., 2, 2]: dz = drift z dt + ..."""
        return self.beta(t)[..., None, None] * self.F

    def diffusion(self, t: Any) -> torch.Tensor:
        """beta(t) D [..., 2, 2]: the covariance rate of the noise."""
        return self.beta(t)[..., None, None] * self.D

    def mean_map(self, s: Any, t: Any) -> torch.Tensor:
        """expm(F (B(t) - B(s))) [..., 2, 2], for any order of s and t (t < s: the inverse map)."""
        return self.expm_F(self.B(t) - self.B(s))

    def kernel_cholesky(self, t: Any) -> torch.Tensor:
        """L_t [..., 2, 2]: Cholesky factor of the covariance of z_t given x0 (m0 ~ N(0, kappa M)
        still random), marginal_cov(t, 0); the eps parameterisation is score = -L_t^-T eps."""
        s = self.marginal_cov(t, 0.0)
        l00 = torch.sqrt(s[..., 0, 0])
        l10 = s[..., 1, 0] / l00
        out = torch.zeros_like(s)
        out[..., 0, 0], out[..., 1, 0], out[..., 1, 1] = l00, l10, torch.sqrt(s[..., 1, 1] - l10**2)
        return out

    def quadrature(self, t: float, s: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nodes u [n] in (t, s), 0 < t < s, and weights w [n]: int_t^s f(u) du ~ sum w f(u), Gauss-Legendre
        in log u (the eps kernel L_u^-T grows like 1 / u towards u = 0)."""
        v, wv = gl_rule(math.log(t), math.log(s), n)
        u = torch.exp(v)
        return u, wv * u

    def transition(self, s: Any, t: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(Phi, Q) [..., 2, 2] float64: z_t | z_s ~ N(Phi z_s, Q) per pixel, for times s <= t."""
        s, t = _f64(s), _f64(t)
        if bool((s > t).any()) or bool((s < 0).any()):
            raise ProcessError(f"PSLD.transition(s, t) needs 0 <= s <= t, got s={s.tolist()}, t={t.tolist()}")
        b = self.B(t) - self.B(s)
        phi = self.expm_F(b)
        p = self.prior_cov()
        q = p - phi @ p @ phi.transpose(-1, -2)
        short = b <= self._series_b
        if bool(short.any()):
            q[short] = self._q_series(b[short])
        return phi, 0.5 * (q + q.transpose(-1, -2))

    @property
    def _series_b(self) -> float:
        return 1.0 / float(torch.linalg.matrix_norm(self.F, ord=2))

    def _q_series(self, b: torch.Tensor) -> torch.Tensor:
        """Q for b <= 1 / |F|: sum_n b^(n+1) / (n+1)! L^n(D), 25 terms (|L| b <= 2: the tail is below 2^25 / 26!)."""
        f = self.F
        bb = torch.clamp(b, max=self._series_b)[..., None, None]
        term = self.D * bb
        total = term
        for n in range(1, 25):
            term = (f @ term + term @ f.T) * bb / (n + 1)
            total = total + term
        return total

    def marginal_cov(self, t: Any, var_x: Any = 0.0) -> torch.Tensor:
        """Covariance of z_t when z_0 ~ N(., diag(var_x, kappa M)): Phi Sigma_0 Phi^T + Q [..., 2, 2].
        var_x = 0 gives the perturbation kernel of z_t given x_0 (m_0 still random)."""
        phi, q = self.transition(0.0, t)
        s0 = self.initial_cov(var_x)
        return phi @ s0 @ phi.transpose(-1, -2) + q

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """z_T for data of shape [B, C, ...]: [B, 2C, ...] float64, x ~ N(0, 1) then m ~ N(0, M)."""
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        m = torch.randn(shape, generator=generator, dtype=torch.float64) * math.sqrt(self.M)
        return torch.cat([x, m], dim=1)
