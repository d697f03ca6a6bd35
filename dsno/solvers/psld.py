"""Samplers for augmented linear diffusions: PSLD (z = (x, m), k = 2 components per pixel), and
any scalar schedule seen as k = 1 (`as_augmented`), after Pandey, Rudolph & Mandt (ICLR 2024).

The teacher gives `process` (drift(t), diffusion(t), mean_map(s, t), kernel_cholesky(t): k x k per
pixel, float64), `score(z, t)` and `eps(z, t)` with score = -L_t^-T eps. States z: [B, kC, ...],
component j in channels jC .. (j + 1)C - 1; they keep their dtype (coefficients are float64, cast
to it). With drift = beta F and diffusion = beta D:

    probability-flow ODE   dz/dt = beta F z - 1/2 beta D score
    reverse SDE            dz = (beta F z - beta D score) dt + sqrt(beta) G dW,  G G^T = D

- "augmented_euler": Euler on the PF-ODE (order 1; stiff, it needs many steps on PSLD);
- "augmented_euler_maruyama": Euler-Maruyama on the reverse SDE (weak order 1);
- "lambda_ddim": the conjugate integrator with B_t = lam I (lambda-DDIM-I). In z_hat = A_t z,
  A_t = e^(lam t) Phi(0, t)^-1, the PF-ODE is dz_hat/dt = lam z_hat + dPhi_hat/dt eps with
  dPhi_hat/dt = 1/2 A_t beta_t D L_t^-T; one Euler step in z_hat with Phi_hat integrated exactly:

      z_t = (1 + lam (t - s)) e^(lam (s - t)) Phi(s -> t) z_s + C_e eps(z_s, s),
      C_e = int_s^t 1/2 e^(lam (u - t)) Phi(u -> t) beta_u D L_u^-T du

  (Gauss-Legendre in the process's own variable, `process.quadrature`). lam = 0 on VP is DDIM:
  Phi(s -> t) = alpha_t / alpha_s and C_e = alpha_t (rho_t - rho_s).
  variant="II" takes B_t = lam 1 (the all-ones k x k matrix, lambda-DDIM-II): A_t = e^(lam t 1) Phi(0, t)^-1
  solves dA/dt = B A - A beta F although 1 and F do not commute, and the step becomes

      z_t = Phi(0, t) (I + lam (t - s) 1) e^(lam (s - t) 1) Phi(0, s)^-1 z_s + C_e eps(z_s, s),
      C_e = int_s^t 1/2 Phi(0, t) e^(lam (u - t) 1) Phi(0, u)^-1 beta_u D L_u^-T du,

  e^(c 1) = I + (e^(k c) - 1) / k 1. Both variants are one option of one solver (same step, same cost; only
  B_t differs). They agree exactly at lam = 0 (B_t = 0) and for k = 1 (1 = I).
- "sscs": the symmetric splitting CLD sampler (Dockhorn et al. 2022) for the reverse SDE. With the
  stationary covariance S = diag(1, M) (prior_cov) the reverse drift is -beta F z + beta D score
  = beta F_A z + beta D (score + S^-1 z), F_A = S F^T S^-1 (F_A S + S F_A^T + D = 0: the reverse of the
  stationary process). A step s -> t is an exact half step of dz = beta F_A z dtau + sqrt(beta) G dW
  (mean expm(F_A b / 2), covariance by Van Loan's block exponential, b = B(s) - B(t)), an Euler step
  z += b D (score + S^-1 z) at the midpoint time, and another exact half step. denoise_to_zero: the
  public PSLD code's final step, the noise-free reverse-SDE Euler step from t_end to 0 (one more NFE).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsno.errors import UserError
from dsno.processes.linear import ScalarLinear
from dsno.solvers.coefficients import GAUSS_LEGENDRE_NODES
from dsno.solvers.core import NoiseSampler, Trajectory, combine, noise_source
from dsno.solvers.registry import choice, register

VARIANTS = ("I", "II")


class AugmentedView:
    """A scalar-schedule Teacher (VP / VE / flow) as an augmented teacher with k = 1."""

    augmented = True

    def __init__(self, teacher: Any):
        self.teacher = teacher
        self.process = ScalarLinear(teacher.schedule)

    def eps(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return self.teacher.eps(x, t)

    def score(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return -self.teacher.eps(x, t) / float(self.teacher.schedule.sigma(float(t)))

    def x0(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return self.teacher.x0(x, t)


def as_augmented(teacher: Any) -> AugmentedView:
    """View a Teacher on a scalar schedule through the augmented solvers (k = 1)."""
    return AugmentedView(teacher)


def apply(m: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
    """The per-pixel k x k matrix m [k, k] applied to the state z [B, kC, ...]."""
    zr = z.reshape(z.shape[0], k, -1)
    return torch.einsum("ij,bjd->bid", m.to(device=z.device, dtype=z.dtype), zr).reshape(z.shape)


def psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """A symmetric square root of a positive semi-definite k x k matrix (singular allowed: CLD's D)."""
    w, v = torch.linalg.eigh(m)
    return (v * torch.sqrt(torch.clamp(w, min=0.0))) @ v.T


def _state_check(teacher: Any, z: torch.Tensor) -> int:
    k = int(teacher.process.k)
    if z.ndim < 2 or z.shape[1] % k:
        raise ValueError(f"an augmented state has k = {k} components stacked on dim 1 ([B, {k}C, ...]), got "
                         f"shape {tuple(z.shape)}")
    return k


def _one_per_step(steps: int, order: int, o: dict) -> int:
    return steps


@register("augmented_euler", orders=(1,), cost=_one_per_step, cost_rule="1 per step", process="augmented")
def augmented_euler(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1,
                    return_trajectory: bool = False) -> torch.Tensor:
    """z_t = z_s + (t - s) (beta F z_s - 1/2 beta D score(z_s, s)).  x: the state z_T [B, kC, ...]."""
    k = _state_check(teacher, x)
    proc = teacher.process
    times = ts.tolist()
    traj = Trajectory(x, return_trajectory)
    for s, t in zip(times[:-1], times[1:]):
        score = teacher.score(x, s).to(x.dtype)
        slope = combine([(1.0, apply(proc.drift(s), x, k)), (-0.5, apply(proc.diffusion(s), score, k))])
        x = combine([(1.0, x), (t - s, slope)])
        traj.add(x)
    return traj.result(x)


@register("augmented_euler_maruyama", orders=(1,), cost=_one_per_step, cost_rule="1 per step", stochastic=True,
          process="augmented")
def augmented_euler_maruyama(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1,
                             return_trajectory: bool = False, generator: torch.Generator | None = None,
                             noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """z_t = z_s + (t - s) (beta F z_s - beta D score) + sqrt(s - t) sqrt(beta D) xi, xi ~ N(0, I)."""
    k = _state_check(teacher, x)
    proc = teacher.process
    noise = noise_source(x, generator, noise_sampler)
    times = ts.tolist()
    traj = Trajectory(x, return_trajectory)
    for s, t in zip(times[:-1], times[1:]):
        d = proc.diffusion(s)
        slope = combine([(1.0, apply(proc.drift(s), x, k)), (-1.0, apply(d, teacher.score(x, s).to(x.dtype), k))])
        kick = apply(psd_sqrt(d.reshape(k, k)), noise(s, t), k)
        x = combine([(1.0, x), (t - s, slope), (math.sqrt(s - t), kick)])
        traj.add(x)
    return traj.result(x)


def lower_inverse_t(m: torch.Tensor) -> torch.Tensor:
    """L^-T [..., k, k] of lower-triangular L (closed form for k <= 2)."""
    k = m.shape[-1]
    if k == 1:
        return 1.0 / m
    if k == 2:
        out = torch.zeros_like(m)
        out[..., 0, 0], out[..., 1, 1] = 1.0 / m[..., 0, 0], 1.0 / m[..., 1, 1]
        out[..., 0, 1] = -m[..., 1, 0] / (m[..., 0, 0] * m[..., 1, 1])
        return out
    eye = torch.eye(k, dtype=m.dtype).expand_as(m)
    return torch.linalg.solve_triangular(m, eye, upper=False).transpose(-1, -2)


def finite_option(name: str, value: Any) -> float:
    """value as a float; UserError (one line) unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"option {name}={value!r} must be a finite number")
    return float(value)


def exp_ones(c: Any, k: int) -> torch.Tensor:
    """e^(c 1) [..., k, k] for the all-ones matrix 1 (1^2 = k 1) and c [...]: I + (e^(k c) - 1) / k 1, float64."""
    c = torch.as_tensor(c, dtype=torch.float64)
    return torch.eye(k, dtype=torch.float64) + (torch.expm1(k * c) / k)[..., None, None] * torch.ones(
        k, k, dtype=torch.float64)


def lambda_ddim_weights(process: Any, s: float, t: float, lam: float, n_quad: int = GAUSS_LEGENDRE_NODES,
                        variant: str = "I") -> tuple[torch.Tensor, torch.Tensor]:
    """(C_x, C_e) [k, k] float64 of one lambda-DDIM step from s to t < s (see the module doc)."""
    k = process.k
    u, w = process.quadrature(t, s, n_quad)                                            # nodes in (t, s)
    l_inv_t = lower_inverse_t(process.kernel_cholesky(u))                               # [n, k, k]
    forcing = process.diffusion(u) @ l_inv_t                                            # [n, k, k]
    if variant == "I":
        c_x = (1.0 + lam * (t - s)) * math.exp(lam * (s - t)) * process.mean_map(s, t).reshape(k, k)
        integrand = torch.exp(lam * (u - t))[:, None, None] * process.mean_map(u, t) @ forcing
    else:
        to_t = process.mean_map(0.0, t).reshape(k, k)
        ones = torch.ones(k, k, dtype=torch.float64)
        mid = (torch.eye(k, dtype=torch.float64) + lam * (t - s) * ones) @ exp_ones(lam * (s - t), k)
        c_x = to_t @ mid @ process.mean_map(s, 0.0).reshape(k, k)
        conj = exp_ones(lam * (u - t), k)                                                # [n, k, k]
        integrand = to_t @ conj @ process.mean_map(u, 0.0) @ forcing
    c_e = -0.5 * (w[:, None, None] * integrand).sum(0)                                   # int_s^t = -int_t^s
    return c_x, c_e


@register("lambda_ddim", orders=(1,), cost=_one_per_step, cost_rule="1 per step", process="augmented")
def lambda_ddim(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
                lam: float = 0.0, variant: str = "I") -> torch.Tensor:
    """lambda-DDIM (conjugate integrator): variant "I" B_t = lam I, "II" B_t = lam 1 (all ones); lam = 0 on
    a VP teacher is DDIM."""
    lam = finite_option("lam", lam)
    choice("variant", variant, VARIANTS)
    k = _state_check(teacher, x)
    times = ts.tolist()
    traj = Trajectory(x, return_trajectory)
    for s, t in zip(times[:-1], times[1:]):
        c_x, c_e = lambda_ddim_weights(teacher.process, s, t, lam, variant=variant)
        x = combine([(1.0, apply(c_x, x, k)), (1.0, apply(c_e, teacher.eps(x, s).to(x.dtype), k))])
        traj.add(x)
    return traj.result(x)


# --- SSCS -------------------------------------------------------------------------------------

def stationary_parts(process: Any, solver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F, D, S) [k, k] float64 of a process dz = beta F z dt + sqrt(beta) G dW (G G^T = D) with stationary
    covariance S (PSLD); UserError naming the solver for one without them (a scalar schedule)."""
    if not all(hasattr(process, a) for a in ("F", "D", "prior_cov", "B")):
        raise UserError(f"solver {solver!r} needs a process dz = beta F z dt + sqrt(beta) G dW with a stationary "
                        f"law (PSLD); {process!r} is not one, use lambda_ddim, augmented_euler or "
                        f"augmented_euler_maruyama")
    return process.F, process.D, process.prior_cov()


def stationary_reverse_kernel(process: Any, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, Q) [k, k] float64: dz = beta F_A z dtau + sqrt(beta) G dW over int beta = b >= 0 gives
    z -> N(E z, Q), F_A = S F^T S^-1 (Van Loan: expm of [[-F_A, D], [0, F_A^T]] b, no cancellation)."""
    k = process.k
    f, d, sig = stationary_parts(process, "sscs")
    f_a = sig @ f.T @ torch.linalg.inv(sig)
    block = torch.zeros(2 * k, 2 * k, dtype=torch.float64)
    block[:k, :k], block[:k, k:], block[k:, k:] = -f_a, d, f_a.T
    e = torch.linalg.matrix_exp(block * b)
    phi = e[k:, k:].T
    q = phi @ e[:k, k:]
    return phi, 0.5 * (q + q.T)


def _sscs_cost(steps: int, order: int, o: dict) -> int:
    return steps + int(o["denoise_to_zero"])


@register("sscs", orders=(1,), cost=_sscs_cost, cost_rule="1 per step (+1 with denoise_to_zero)", stochastic=True,
          process="augmented")
def sscs(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 1, return_trajectory: bool = False,
         generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
         denoise_to_zero: bool = False) -> torch.Tensor:
    """Symmetric splitting CLD sampler: exact half step, Euler score step, exact half step (module doc)."""
    k = _state_check(teacher, x)
    proc = teacher.process
    _, d_unit, sig = stationary_parts(proc, "sscs")
    noise = noise_source(x, generator, noise_sampler)
    sig_inv = torch.linalg.inv(sig)
    times = ts.tolist()
    traj = Trajectory(x, return_trajectory)

    def half(z: torch.Tensor, a: float, b: float) -> torch.Tensor:
        e, q = stationary_reverse_kernel(proc, float(proc.B(a) - proc.B(b)))
        return combine([(1.0, apply(e, z, k)), (1.0, apply(psd_sqrt(q), noise(a, b), k))])

    for s, t in zip(times[:-1], times[1:]):
        mid = 0.5 * (s + t)
        x = half(x, s, mid)
        rel = combine([(1.0, teacher.score(x, mid).to(x.dtype)), (1.0, apply(sig_inv, x, k))])
        x = combine([(1.0, x), (float(proc.B(s) - proc.B(t)), apply(d_unit, rel, k))])
        x = half(x, mid, t)
        traj.add(x)
    if denoise_to_zero:
        t_end = times[-1]
        slope = combine([(1.0, apply(proc.drift(t_end), x, k)),
                         (-1.0, apply(proc.diffusion(t_end), teacher.score(x, t_end).to(x.dtype), k))])
        x = combine([(1.0, x), (-t_end, slope)])
        traj.add(x)
    return traj.result(x)
