"""The exact PSLD Gaussian-mixture teacher against independent computations.

1. Its log-density equals a full-covariance multivariate normal mixture built from the
   process's own 2x2 marginal covariances (torch.distributions, no per-pixel formulas), and its
   score equals central finite differences of that density.
2. Monte Carlo on forward samples z_t = Phi z_0 + chol(Q) xi (drawn with process.transition):
   Stein's identity E[score(z) z^T] = -I, E[score] = 0, and the regression optimality of the eps
   and x0 outputs: E[(eps_true - eps(z_t)) g(z_t)] = 0 for g = eps(z_t) and g = z_t, with
   eps_true = L_t^-1 (z_t - Phi (x0, 0)); each mean within 5 standard errors of 0.
3. The 6-channel layout and score = -L^-T eps.
"""

import math

import pytest
import torch

from dsno.processes import PSLD
from dsno.teachers import PSLDGaussianMixture

PROCESSES = {"psld": PSLD(), "cld (gamma = 0)": PSLD(gamma=0.0, nu=4.0), "linear beta": PSLD(0.1, 20.0, 3.0, 0.5)}


def teacher(process, shape=(2, 1, 2), k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, *shape, generator=g, dtype=torch.float64)
    variances = 0.05 + 0.3 * torch.rand(k, *shape, generator=g, dtype=torch.float64)
    return PSLDGaussianMixture(means, variances, torch.tensor([0.2, 0.5, 0.3][:k]), process=process)


def reference_log_prob(tch: PSLDGaussianMixture, z: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t(z) from a full [2D, 2D] covariance per component (pixels in (x_1..x_D, m_1..m_D) order)."""
    p = tch.process
    phi, _ = p.transition(0.0, t)
    d = tch.means.shape[1]
    flat = torch.cat([v.reshape(len(z), -1) for v in tch.split(z)], dim=1)          # [B, 2D]
    comps = []
    for k in range(tch.num_components):
        cov = torch.zeros(2 * d, 2 * d, dtype=torch.float64)
        mean = torch.cat([phi[0, 0] * tch.means[k], phi[1, 0] * tch.means[k]])
        for i in range(d):
            s = p.marginal_cov(t, float(tch.variances[k, i]))
            idx = torch.tensor([i, d + i])
            cov[idx[:, None], idx[None, :]] = s
        mvn = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        comps.append(mvn.log_prob(flat) + tch.log_weights[k])
    return torch.logsumexp(torch.stack(comps, 1), 1)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_log_prob_and_score_against_a_full_covariance_mixture(name):
    tch = teacher(PROCESSES[name])
    g = torch.Generator().manual_seed(3)
    for t in (1e-3, 0.1, 0.5, 1.0):
        z = _forward(tch, 6, t, g)[0]
        assert torch.allclose(tch.log_prob(z, t), reference_log_prob(tch, z, t), rtol=1e-11, atol=1e-10)
        score = tch.score(z, t)
        fd = torch.zeros_like(z)
        flat = z.reshape(len(z), -1)
        for j in range(flat.shape[1]):
            h = 1e-5 * max(1.0, float(flat[:, j].abs().max()))
            e = torch.zeros_like(flat)
            e[:, j] = h
            up = reference_log_prob(tch, (flat + e).reshape(z.shape), t)
            down = reference_log_prob(tch, (flat - e).reshape(z.shape), t)
            fd.reshape(len(z), -1)[:, j] = (up - down) / (2 * h)
        assert torch.allclose(score, fd, rtol=1e-5, atol=1e-5 * float(score.abs().max())), (t, score - fd)


def _forward(tch: PSLDGaussianMixture, n: int, t: float, g: torch.Generator):
    """(z_t, x0, eps_true): forward samples through the process's transition."""
    z0 = tch.sample_data(n, g)
    x0, m0 = tch.split(z0)
    phi, q = tch.process.transition(0.0, t)
    lq = torch.linalg.cholesky(q + 1e-300 * torch.eye(2, dtype=torch.float64))
    xi = torch.randn(2, *x0.shape, generator=g, dtype=torch.float64)
    xt = phi[0, 0] * x0 + phi[0, 1] * m0 + lq[0, 0] * xi[0]
    mt = phi[1, 0] * x0 + phi[1, 1] * m0 + lq[1, 0] * xi[0] + lq[1, 1] * xi[1]
    lk = tch.kernel_cholesky(t)                                    # eps_true = L^-1 (z_t - Phi (x0, 0))
    rx, rm = xt - phi[0, 0] * x0, mt - phi[1, 0] * x0
    ex = rx / lk[0, 0]
    em = (rm - lk[1, 0] * ex) / lk[1, 1]
    return tch.join(xt, mt), x0, tch.join(ex, em)


def _near_zero(samples: torch.Tensor, what: str) -> None:
    """Each column's mean is within 5 standard errors of 0."""
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    assert bool((mean.abs() < 5 * se + 1e-12).all()), f"{what}: mean {mean.tolist()}, 5 se {(5 * se).tolist()}"


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("t", [0.05, 0.4])
def test_monte_carlo_identities(name, t):
    tch = teacher(PROCESSES[name])
    n = 100_000
    z, x0, eps_true = _forward(tch, n, t, torch.Generator().manual_seed(7))
    score, eps, x0_hat = tch.score(z, t), tch.eps(z, t), tch.x0(z, t)
    sx, sm = tch.split(score)
    xt, mt = tch.split(z)
    eye = torch.cat([torch.ones_like(sx), torch.zeros_like(sx), torch.zeros_like(sx), torch.ones_like(sx)], 1)
    stein = torch.cat([sx * xt, sx * mt, sm * xt, sm * mt], 1) + eye
    _near_zero(stein, "E[score z^T] + I")
    _near_zero(score.reshape(n, -1), "E[score]")
    r = (eps_true - eps).reshape(n, -1)
    _near_zero(r * eps.reshape(n, -1), "E[(eps_true - eps) eps]")
    _near_zero(r * z.reshape(n, -1), "E[(eps_true - eps) z]")
    rx = (x0 - x0_hat.reshape(n, -1))
    _near_zero(torch.cat([rx * xt, rx * mt], 1), "E[(x0 - x0_hat) z]")
    assert float(r.pow(2).mean()) < float(eps_true.pow(2).mean())     # the teacher explains part of the noise


def test_six_channel_layout_and_eps_parameterisation():
    tch = teacher(PSLD(), shape=(3, 2, 2), k=2)
    assert tch.state_shape == (6, 2, 2)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1e-3, 0.2, 0.2, 0.9], dtype=torch.float64)
    z = torch.cat([_forward(tch, 1, float(ti), g)[0] for ti in t])
    eps = tch(z, t)
    assert eps.shape == (4, 6, 2, 2) and eps.dtype == torch.float64
    assert torch.allclose(tch.score_from_eps(eps, t), tch.score(z, t), rtol=1e-12, atol=1e-12)
    lt = tch.kernel_cholesky(t)                                        # score = -L^-T eps, pixel by pixel
    s = tch.score(z, t)
    for b in range(4):
        pair = torch.stack([eps[b, :3].reshape(-1), eps[b, 3:].reshape(-1)])       # [2, 12]
        want = -torch.linalg.solve_triangular(lt[b].T, pair, upper=True)
        assert torch.allclose(torch.stack([s[b, :3].reshape(-1), s[b, 3:].reshape(-1)]), want, rtol=1e-12)
    for b in range(4):                                                 # a batch of times = one time per row
        assert torch.allclose(tch.score(z[b:b + 1], float(t[b])), s[b:b + 1], rtol=1e-14)
    with pytest.raises(ValueError, match=r"z must be \[B, 6, 2, 2\]"):
        tch.score(z[:, :3], 0.5)
