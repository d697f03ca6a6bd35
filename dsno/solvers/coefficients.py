"""Step coefficients of the solvers: pure float64 functions of times, log-SNRs and orders.

Nothing here touches a tensor. The solvers compute their weights with these functions and
apply them to the state (cast to the state's dtype by ordinary Python-float arithmetic).

Notation (variance preserving): alpha, sigma with alpha^2 + sigma^2 = 1, lambda = log(alpha /
sigma), rho = sigma / alpha = exp(-lambda). A step goes from s (noisier) to t, h = lambda_t - lambda_s > 0.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

GAUSS_LEGENDRE_NODES = 32


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j>=0} z^j / (j + k)!  (phi_0 = e^z, phi_1 = (e^z - 1) / z, ...).

    The exponential-integrator functions; a Taylor series for |z| < 1, the recurrence
    phi_{k+1} = (phi_k - 1/k!) / z above, so no digits are lost at small steps.
    """
    if k < 0:
        raise ValueError(f"phi_k needs k >= 0, got {k}")
    if k == 0:
        return math.exp(z)
    if abs(z) < 1.0:
        total, term = 0.0, 1.0 / math.factorial(k)
        for j in range(40):
            total += term
            term *= z / (j + k + 1)
        return total
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def exponential_frame(lam_s: float, lam_t: float, alpha: tuple[float, float], sigma: tuple[float, float],
                      data: bool) -> tuple[float, float, float]:
    """(ratio, gain, z) of the exact solution of the probability-flow ODE from s to t:

        x_t = ratio * x_s - gain * sum_k z phi_{k+1}(z) h^k f^(k)(lambda_s)

    where f is the data prediction x0 (data=True: ratio = sigma_t / sigma_s, gain = alpha_t,
    z = -h) or the noise prediction eps (data=False: ratio = alpha_t / alpha_s, gain = sigma_t,
    z = h), and f^(k) its k-th derivative in lambda. alpha, sigma: (value at s, value at t).
    """
    h = lam_t - lam_s
    if data:
        return sigma[1] / sigma[0], alpha[1], -h
    return alpha[1] / alpha[0], sigma[1], h


def taylor_weights(z: float, order: int) -> list[float]:
    """[z phi_1(z), z phi_2(z), ..., z phi_order(z)]: the weights of D0, D1 ~ h f', D2 ~ h^2 f'', ..."""
    return [z * phi(k, z) for k in range(1, order + 1)]


# --- multistep DPM-Solver(++) ----------------------------------------------------------------

def multistep_weights(z: float, ratios: Sequence[float], order: int, solver_type: str = "midpoint",
                      shipped_3m: bool = False) -> list[float]:
    """Weights w_j of the history f_0 (newest), f_1, ... in  x_t = ratio x_s - gain * sum_j w_j f_j.

    ratios: r_k = (lambda_{s_k} - lambda_{s_{k+1}}) / h for the past steps (r_0 the step that
    ended at s). Order 2: D1 = (f_0 - f_1) / r_0, weight 1/2 z phi_1 ("midpoint", DPM-Solver++
    2M) or z phi_2 ("heun"). Order 3 (3M): D1 and D2 from divided differences, D2 estimates
    h^2 f''; `shipped_3m=True` halves D2 as the public reference code, diffusers and
    k-diffusion do, which makes the method second order.
    """
    w = taylor_weights(z, 3)
    if order == 1:
        return [w[0]]
    if order == 2:
        r0 = ratios[0]
        c1 = 0.5 * w[0] if solver_type == "midpoint" else w[1]
        return [w[0] + c1 / r0, -c1 / r0]
    if order == 3:
        r0, r1 = ratios[0], ratios[1]
        d1_0 = np.array([1.0 / r0, -1.0 / r0, 0.0])
        d1_1 = np.array([0.0, 1.0 / r1, -1.0 / r1])
        diff = d1_0 - d1_1
        d1 = d1_0 + r0 / (r0 + r1) * diff
        d2 = (1.0 if shipped_3m else 2.0) / (r0 + r1) * diff
        out = w[0] * np.array([1.0, 0.0, 0.0]) + w[1] * d1 + w[2] * d2
        return [float(v) for v in out]
    raise ValueError(f"multistep DPM-Solver has orders 1..3, got {order}")


# --- singlestep DPM-Solver(++) ---------------------------------------------------------------

SINGLESTEP_R = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


def singlestep_stage_weights(z: float, r: tuple[float, ...], stage: int) -> list[float]:
    """Weights on (f_s, f_1, ...) for intermediate stage `stage` (1-based) or the final update
    (stage = len(r) + 1) of DPM-Solver-k (Lu et al. 2022, Algorithms 1 and 2), with z the
    frame's z for the whole step; stage i sits at lambda_s + r_i h and uses the sub-step z r_i.

    DPM-Solver-2 final:  z phi_1 (f_s + (f_1 - f_s) / (2 r_1)).
    DPM-Solver-3:        stage 2: z2 phi_1(z2) f_s + z2 phi_2(z2) (r_2 / r_1) (f_1 - f_s),  z2 = r_2 z,
                         final:   z phi_1(z) f_s + z phi_2(z) (f_2 - f_s) / r_2.
    """
    k = len(r) + 1
    if stage == 1:
        zz = r[0] * z if k > 1 else z
        return [zz * phi(1, zz)]
    if k == 2 and stage == 2:
        a = z * phi(1, z)
        return [a - a / (2 * r[0]), a / (2 * r[0])]
    if k == 3 and stage == 2:
        z2 = r[1] * z
        a, b = z2 * phi(1, z2), z2 * phi(2, z2) * r[1] / r[0]
        return [a - b, b]
    if k == 3 and stage == 3:
        a, b = z * phi(1, z), z * phi(2, z) / r[1]
        return [a - b, 0.0, b]
    raise ValueError(f"no stage {stage} in DPM-Solver-{k}")


def fast_orders(nfe: int, max_order: int) -> list[int]:
    """Per-step orders of DPM-Solver's NFE-budget mode (`dpm_solver_fast`): they sum to `nfe`.

    order 3: K = nfe // 3 + 1 steps, [3]*(K-2) + [2, 1] if nfe % 3 == 0, [3]*(K-1) + [1] if 1,
    [3]*(K-1) + [2] if 2; order 2: [2]*(nfe/2), or [2]*(nfe//2) + [1]; order 1: [1]*nfe.
    """
    if nfe < 1:
        raise ValueError(f"an NFE budget must be >= 1, got {nfe}")
    if max_order == 1:
        return [1] * nfe
    if max_order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    if max_order == 3:
        k = nfe // 3 + 1
        if nfe % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        return [3] * (k - 1) + [nfe % 3]
    raise ValueError(f"the fast order mix exists for orders 1..3, got {max_order}")


# --- DEIS: exact kernel times Lagrange basis, by Gauss-Legendre ---------------------------------

def lagrange_kernel_weights(nodes: Sequence[float], log_rho_s: float, log_rho_t: float,
                            xi_of_log_rho: Callable[[np.ndarray], np.ndarray],
                            n_quad: int = GAUSS_LEGENDRE_NODES) -> list[float]:
    """c_j = int_{rho_s}^{rho_t} L_j(xi(rho)) d rho, L_j the Lagrange basis on `nodes`.

    The noise-form exponential integrator then reads x_t = alpha_t (x_s / alpha_s + sum_j c_j eps_j).
    xi is the variable the noise prediction is interpolated in (t for tAB-DEIS, rho for
    rhoAB-DEIS, log rho for diffusers' log-rho DEIS), given as a vectorised function of
    u = log rho; the integral is done in u (d rho = e^u du) by an n_quad-point Gauss-Legendre
    rule, accurate to float64 for any step of a diffusion grid.
    """
    gx, gw = np.polynomial.legendre.leggauss(n_quad)
    half = 0.5 * (log_rho_t - log_rho_s)
    u = log_rho_s + half * (gx + 1.0)
    w = gw * half * np.exp(u)
    xi = np.asarray(xi_of_log_rho(u), dtype=np.float64)
    nodes = np.asarray(nodes, dtype=np.float64)
    out = []
    for j in range(len(nodes)):
        basis = np.ones_like(xi)
        for m in range(len(nodes)):
            if m != j:
                basis *= (xi - nodes[m]) / (nodes[j] - nodes[m])
        out.append(float(np.sum(w * basis)))
    return out


# --- Runge-Kutta tableaux (rhoRK-DEIS, Heun) -------------------------------------------------

RK_TABLEAUX: dict[int, tuple[tuple[float, ...], tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    # stages: (c, a (lower triangle rows), b)
    1: ((0.0,), ((),), (1.0,)),                                                    # Euler
    2: ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),                                     # Heun
    3: ((0.0, 0.5, 1.0), ((), (0.5,), (-1.0, 2.0)), (1 / 6, 4 / 6, 1 / 6)),        # Kutta's third order
    4: ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 2 / 6, 2 / 6, 1 / 6)),  # RK4
}


# --- Adams-Bashforth (iPNDM) ---------------------------------------------------------------

ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def adams_weights(rs: Sequence[float]) -> np.ndarray:
    """(w_s, w_1, ..., w_m): the integral over r in [0, 1] of the Lagrange basis polynomials of
    the nodes (0, *rs); rs = (-1, -2, ...) gives the Adams-Bashforth weights, rs = (1, -1, ...)
    Adams-Moulton (ADAMS_BASHFORTH[k] is the first for rs = (-1, ..., -(k - 1)), in exact
    fractions). They sum to 1. float64."""
    nodes = np.array([0.0, *rs], dtype=np.float64)
    out = np.zeros(len(nodes))
    for j, r_j in enumerate(nodes):
        others = np.delete(nodes, j)
        basis = np.polynomial.polynomial.polyfromroots(others) / np.prod(r_j - others)
        out[j] = np.polynomial.polynomial.polyval(1.0, np.polynomial.polynomial.polyint(basis))
    return out


# --- UniPC ---------------------------------------------------------------------------------

def unipc_weights(z: float, rks: Sequence[float], order: int, variant: str, corrector: bool
                  ) -> tuple[list[float], float]:
    """(rhos, B(h)) of UniP-p (predictor) or UniC-p (corrector), Zhao et al. 2023, as in diffusers.

    rks: (lambda_{s_k} - lambda_s) / h of the p - 1 past points (negative). The update is
        x_t = ratio x_s - gain (z phi_1(z) f_s + B(h) sum_k rho_k D_k),  D_k = (f_k - f_s) / r_k,
    and the corrector adds the new evaluation f_t with r = 1 as the last D. B(h) = z (bh1) or
    e^z - 1 (bh2). The predictor of order 2 uses rho = 1/2; the corrector of order 1 too.
    """
    b_h = z if variant == "bh1" else math.expm1(z)
    points = list(rks) + [1.0]
    size = order if corrector else order - 1
    if size == 0:
        return [], b_h
    if (not corrector and order == 2) or (corrector and order == 1):
        return [0.5], b_h
    mat = np.array([[points[j] ** i for j in range(size)] for i in range(size)], dtype=np.float64)
    rhs = np.array([z * phi(i + 2, z) * math.factorial(i + 1) / b_h for i in range(size)], dtype=np.float64)
    return [float(v) for v in np.linalg.solve(mat, rhs)], b_h


# --- stochastic first-order steps (DDIM with eta, DDPM, SDE-DPM-Solver++) ----------------------

def ddim_weights(lam_s: float, lam_t: float, alpha: tuple[float, float], sigma: tuple[float, float],
                 eta: float) -> tuple[float, float, float]:
    """(c_x, c_eps, c_noise) of DDIM:  x_t = c_x x_s + c_eps eps_s + c_noise z.

    x_t = alpha_t x0 + sqrt(sigma_t^2 - s^2) eps + s z, s^2 = eta^2 sigma_t^2 (1 - e^{-2h})
    (eta = 0: the deterministic exponential integrator; eta = 1: the DDPM posterior).
    """
    h = lam_t - lam_s
    y = eta**2 * -math.expm1(-2.0 * h)
    # sqrt(1 - y) - e^h, written without cancellation
    c_eps = sigma[1] * (-y / (1.0 + math.sqrt(1.0 - y)) - math.expm1(h))
    return alpha[1] / alpha[0], c_eps, sigma[1] * math.sqrt(y)


def sde_dpmpp_weights(lam_s: float, lam_t: float, alpha: tuple[float, float], sigma: tuple[float, float],
                      ratios: Sequence[float], order: int, solver_type: str) -> tuple[float, list[float], float]:
    """(c_x, weights on x0_0, x0_1, ..., c_noise) of SDE-DPM-Solver++ (Lu et al. 2022b; 1S = DDPM):

        x_t = sigma_t/sigma_s e^{-h} x_s + alpha_t (1 - e^{-2h}) (D0 + c D1) + sigma_t sqrt(1 - e^{-2h}) z
    with D1 = (x0_0 - x0_1) / r_0 and c = 1/2 (midpoint) or 2h phi_2(-2h) / (1 - e^{-2h}) (heun).
    """
    h = lam_t - lam_s
    one_minus = -math.expm1(-2.0 * h)
    c_x = sigma[1] / sigma[0] * math.exp(-h)
    noise = sigma[1] * math.sqrt(one_minus)
    base = alpha[1] * one_minus
    if order == 1:
        return c_x, [base], noise
    r0 = ratios[0]
    c1 = 0.5 * base if solver_type == "midpoint" else alpha[1] * 2.0 * h * phi(2, -2.0 * h)
    return c_x, [base + c1 / r0, -c1 / r0], noise
