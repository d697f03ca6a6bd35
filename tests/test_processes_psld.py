"""PSLD's per-pixel transition kernel (Phi, Q) against an independent matrix exponential.

The reference is Van Loan's construction with scipy: for a step c of integrated beta,
expm([[-F, D], [0, F^T]] c) = [[., Phi^-1 Q], [0, Phi^T]], so Phi and Q come from one 4x4
exponential, computed independently of the closed form, the Lyapunov identity and the series
in dsno. One exponential over the whole b = B(t) - B(s) = 8 loses up to 3e-3 in Q (the -F block
grows like e^(|F| b) and Q = Phi (Phi^-1 Q) cancels), so the reference takes n equal sub-steps
c = b / n <= 0.05 and composes them exactly: Phi <- Phi_c Phi, Q <- Phi_c Q Phi_c^T + Q_c.
A 50-digit mpmath exponential (when mpmath is there) checks dsno to 1e-11 relative.
"""

import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

import dsno
from dsno.errors import UserError
from dsno.processes import PSLD, ProcessError

PROCESSES = {
    "default (critical)": PSLD(),
    "cld (gamma = 0)": PSLD(gamma=0.0, nu=4.0),
    "underdamped": PSLD(m_inv=9.0),
    "overdamped": PSLD(m_inv=0.5),
    "linear beta": PSLD(beta_min=0.1, beta_max=20.0, nu=3.0, gamma=0.5),
}
TIMES = [(0.0, 1e-5), (0.0, 1e-3), (0.0, 0.3), (0.0, 1.0), (0.2, 0.25), (0.5, 0.9), (0.97, 1.0)]


def van_loan(p: PSLD, s: float, t: float) -> tuple[np.ndarray, np.ndarray]:
    f = 0.5 * np.array([[-p.gamma, p.m_inv], [-1.0, -p.nu]])
    d = np.diag([p.gamma, p.nu / p.m_inv])
    b0, b1 = p.beta_min, p.beta_max
    b = b0 * (t - s) + 0.5 * (b1 - b0) * (t**2 - s**2)
    n = max(1, math.ceil(b / 0.05))
    e = expm(np.block([[-f, d], [np.zeros((2, 2)), f.T]]) * (b / n))
    phi_c = e[2:, 2:].T
    q_c = phi_c @ e[:2, 2:]
    phi, q = np.eye(2), np.zeros((2, 2))
    for _ in range(n):
        phi, q = phi_c @ phi, phi_c @ q @ phi_c.T + q_c
    return phi, q


def mpmath_kernel(p: PSLD, s: float, t: float) -> tuple[np.ndarray, np.ndarray]:
    mp = pytest.importorskip("mpmath")
    with mp.workdps(50):
        b = mp.mpf(p.beta_min) * (t - s) + mp.mpf(p.beta_max - p.beta_min) / 2 * (mp.mpf(t) ** 2 - mp.mpf(s) ** 2)
        f = mp.matrix([[-p.gamma / 2, p.m_inv / 2], [-0.5, -p.nu / 2]])
        c = mp.zeros(4, 4)
        for i in range(2):
            c[i, i + 2] = (p.gamma, p.nu / p.m_inv)[i] * b
            for j in range(2):
                c[i, j], c[i + 2, j + 2] = -f[i, j] * b, f[j, i] * b
        e = mp.expm(c)
        phi = mp.matrix([[e[2 + j, 2 + i] for j in range(2)] for i in range(2)])
        q = phi * mp.matrix([[e[i, 2 + j] for j in range(2)] for i in range(2)])
        return np.array(phi.tolist(), dtype=float), np.array(q.tolist(), dtype=float)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_kernel_matches_van_loan(name):
    p = PROCESSES[name]
    for s, t in TIMES:
        phi, q = p.transition(s, t)
        assert phi.dtype == torch.float64 and phi.shape == (2, 2) and q.shape == (2, 2)
        phi_ref, q_ref = van_loan(p, s, t)
        np.testing.assert_allclose(phi.numpy(), phi_ref, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(q.numpy(), q_ref, rtol=1e-10, atol=1e-14)
        assert torch.equal(q, q.T) and bool((torch.linalg.eigvalsh(q) >= 0).all())


@pytest.mark.parametrize("name", list(PROCESSES))
def test_kernel_matches_50_digit_arithmetic(name):
    p = PROCESSES[name]
    for s, t in TIMES:
        phi, q = p.transition(s, t)
        phi_ref, q_ref = mpmath_kernel(p, s, t)
        np.testing.assert_allclose(phi.numpy(), phi_ref, rtol=1e-11, atol=0)
        np.testing.assert_allclose(q.numpy(), q_ref, rtol=1e-11, atol=0)


def test_kernel_broadcasts_over_times():
    p = PSLD()
    s = torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64)
    t = torch.tensor([0.3, 0.7, 1.0], dtype=torch.float64)
    phi, q = p.transition(s, t)
    assert phi.shape == (3, 2, 2) and q.shape == (3, 2, 2)
    for i in range(3):
        phi_i, q_i = p.transition(float(s[i]), float(t[i]))
        assert torch.allclose(phi[i], phi_i, rtol=1e-14) and torch.allclose(q[i], q_i, rtol=1e-14)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_chapman_kolmogorov(name):
    p = PROCESSES[name]
    s, u, t = 0.1, 0.45, 0.8
    phi_su, q_su = p.transition(s, u)
    phi_ut, q_ut = p.transition(u, t)
    phi_st, q_st = p.transition(s, t)
    assert torch.allclose(phi_ut @ phi_su, phi_st, rtol=1e-12, atol=1e-15)
    assert torch.allclose(phi_ut @ q_su @ phi_ut.T + q_ut, q_st, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_marginal_covariance_converges_to_the_prior(name):
    p = PROCESSES[name]
    prior = p.prior_cov()
    assert torch.allclose(prior, torch.diag(torch.tensor([1.0, 1.0 / p.m_inv], dtype=torch.float64)))
    f, d = p.F, p.D                                          # the prior is stationary: F S + S F^T + D = 0
    assert float((f @ prior + prior @ f.T + d).abs().max()) < 1e-14
    gaps = [float((p.marginal_cov(t, 0.3) - prior).abs().max()) for t in (0.5, 1.0, 2.0, 4.0, 8.0, 32.0)]
    assert all(a > b or b < 1e-15 for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-9, gaps


def test_default_is_the_cifar_setting():
    p = dsno.processes.PSLD()
    assert p.m_inv == pytest.approx((0.01 - 4.01) ** 2 / 4) == 4.0 and p.M == 0.25
    assert (p.beta_min, p.beta_max, p.nu, p.gamma, p.kappa) == (8.0, 8.0, 4.01, 0.01, 0.04)
    assert float(p.B(1.0)) == 8.0 and torch.allclose(p.initial_cov(0.5), torch.diag(torch.tensor(
        [0.5, 0.04 * 0.25], dtype=torch.float64)))
    z = p.sample_prior((20000, 3), torch.Generator().manual_seed(0))
    assert z.shape == (20000, 6)
    assert abs(float(z[:, :3].var()) - 1.0) < 0.03 and abs(float(z[:, 3:].var()) - 0.25) < 0.01


@pytest.mark.parametrize("kwargs,match", [
    ({"m_inv": 0.0}, "M\\^-1 > 0"), ({"m_inv": -1.0}, "M\\^-1 > 0"),
    ({"gamma": 2.0, "nu": 2.0}, "gamma = nu"),
    ({"beta_min": -1.0}, "beta_min >= 0"), ({"beta_max": -0.5, "beta_min": 0.1}, "beta_max >= 0"),
    ({"beta_min": 0.0, "beta_max": 0.0}, "not both 0"),
    ({"nu": 0.0}, "nu > 0"), ({"nu": -4.0}, "nu > 0"), ({"gamma": -0.1}, "gamma >= 0"),
    ({"nu": math.nan}, "nu must be a finite number"), ({"kappa": -1.0}, "kappa >= 0"),
])
def test_bad_parameters_are_refused_in_one_line(kwargs, match):
    with pytest.raises(ProcessError, match=match) as err:
        PSLD(**kwargs)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_backwards_transition_is_refused():
    with pytest.raises(ProcessError, match="0 <= s <= t"):
        PSLD().transition(0.5, 0.2)
