"""PSLD samplers beyond Euler: lambda-DDIM-II, SSCS, the splitting integrators and their hybrids
(dsno.solvers.psld, dsno.solvers.psld_splitting), float64 on the exact PSLD mixture teacher.

1. Deterministic samplers converge to a DOP853 reference (rtol 1e-12) of the augmented PF-ODE at
   order 1 (slope over the last two step counts within 0.25), on a PSLD with beta = 2 and kappa = 1
   (the CIFAR-10 setting, beta = 8, kappa = 0.04, amplifies errors so much that it is still
   pre-asymptotic at 1600 steps: lambda-DDIM-II, lam = 0.5, errors 1.03, 0.63, 0.14 at 400, 800, 1600).
   All are first order: every sub-step freezes a score that depends on the whole state.
2. lambda-DDIM-II equals lambda-DDIM-I where it must: at lam = 0 (B_t = 0 in both) on PSLD, and for
   every lam on a scalar (k = 1) teacher, where the all-ones matrix is I. For lam != 0 on PSLD they differ.
3. Stochastic samplers: N samples of a 1-pixel, 3-component mixture at t_end against the exact marginal,
   through E_p[r_k(z) g(z)] = w_k E_{N_k}[g] (r_k: the exact responsibilities, g in 1, x, m, x^2, x m,
   m^2): every statistic within 5 standard errors + 0.01. The same check fails a sampler given half
   its noise (noise_sampler) and a sampler whose score has the wrong sign.
4. Bad input is one line.
"""

import math

import pytest
import torch
from scipy.integrate import solve_ivp

import dsno
from dsno.errors import UserError
from dsno.processes import PSLD
from dsno.solvers import available, nfe, solve, steps_for_nfe, timesteps
from dsno.solvers.psld import apply, as_augmented
from dsno.teachers import GaussianMixture, PSLDGaussianMixture

T_END = 1e-3
VP_TIMES = dsno.VPSchedule.linear()


def slope(errs, steps):
    return math.log(errs[-2] / errs[-1]) / math.log(steps[-1] / steps[-2])


@pytest.fixture(scope="module")
def reference():
    g = torch.Generator().manual_seed(0)
    proc = PSLD(2.0, 2.0, kappa=1.0)
    teacher = PSLDGaussianMixture(torch.randn(3, 2, generator=g, dtype=torch.float64),
                                  0.2 + 0.3 * torch.rand(3, 2, generator=g, dtype=torch.float64), process=proc)
    z_T = proc.sample_prior((3, 2), g)

    def pf_ode(t, y):
        z = torch.from_numpy(y).reshape(z_T.shape)
        return (apply(proc.drift(t), z, 2) - 0.5 * apply(proc.diffusion(t), teacher.score(z, t), 2)).reshape(-1).numpy()

    sol = solve_ivp(pf_ode, (1.0, T_END), z_T.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.status == 0
    return teacher, z_T, torch.from_numpy(sol.y[:, -1]).reshape(z_T.shape)


# --- 1. orders ---------------------------------------------------------------------------------

DETERMINISTIC = [("augmented_euler", {}), ("lambda_ddim", {"variant": "II", "lam": 0.5}), ("nvv", {}), ("rvv", {}),
                 ("csps_d", {}), ("csps_d", {"lam": 0.5}), ("csps_d", {"precondition": True})]


@pytest.mark.parametrize("solver,opts", DETERMINISTIC,
                         ids=[f"{s}{'-' + str(o) if o else ''}" for s, o in DETERMINISTIC])
def test_deterministic_samplers_converge_at_order_one(reference, solver, opts):
    teacher, z_T, ref = reference
    steps = (20, 40, 80)
    errs = [float((solve(teacher, z_T, timesteps(VP_TIMES, n, "time_uniform"), solver=solver, **opts) - ref)
                  .abs().max()) for n in steps]
    trace = f"errors {['%.2e' % e for e in errs]}, observed order {slope(errs, steps):.2f}"
    assert all(a > b for a, b in zip(errs, errs[1:])), trace
    assert abs(slope(errs, steps) - 1.0) <= 0.25, trace
    assert errs[-1] < 0.1, trace


def test_csps_d_preconditioned_at_lam_zero_is_rvv(reference):
    teacher, z_T, _ = reference
    ts = timesteps(VP_TIMES, 30, "time_uniform")
    a = solve(teacher, z_T, ts, solver="csps_d", precondition=True, return_trajectory=True)
    b = solve(teacher, z_T, ts, solver="rvv", return_trajectory=True)
    assert float((a - b).abs().max()) < 1e-10 * float(b.abs().max())


# --- 2. lambda-DDIM-II against -I ----------------------------------------------------------------

def test_lambda_ddim_two_equals_one_where_it_must(reference):
    teacher, z_T, _ = reference
    ts = timesteps(VP_TIMES, 25, "time_uniform")
    one = solve(teacher, z_T, ts, solver="lambda_ddim", lam=0.0, variant="I", return_trajectory=True)
    two = solve(teacher, z_T, ts, solver="lambda_ddim", lam=0.0, variant="II", return_trajectory=True)
    assert float((one - two).abs().max()) < 1e-12 * float(one.abs().max())
    one = solve(teacher, z_T, ts, solver="lambda_ddim", lam=0.5, variant="I")
    two = solve(teacher, z_T, ts, solver="lambda_ddim", lam=0.5, variant="II")
    assert float((one - two).abs().max()) > 1e-3                          # B_t = lam 1 is another integrator
    g = torch.Generator().manual_seed(2)
    gmm = GaussianMixture(torch.randn(2, 3, generator=g, dtype=torch.float64), torch.full((2,), 0.2),
                          schedule=VP_TIMES)
    x_T = torch.randn(4, 3, generator=g, dtype=torch.float64)
    grid = timesteps(VP_TIMES, 12)
    for lam in (-1.0, 0.7):
        one = solve(as_augmented(gmm), x_T, grid, solver="lambda_ddim", lam=lam, variant="I")
        two = solve(as_augmented(gmm), x_T, grid, solver="lambda_ddim", lam=lam, variant="II")
        assert float((one - two).abs().max()) < 1e-12


# --- 3. stochastic samplers against the exact mixture ---------------------------------------------

def mixture_teacher() -> PSLDGaussianMixture:
    return PSLDGaussianMixture(torch.tensor([[-1.0], [0.5], [1.5]], dtype=torch.float64),
                               torch.tensor([[0.1], [0.05], [0.2]], dtype=torch.float64),
                               torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64), process=PSLD())


def moment_gaps(teacher: PSLDGaussianMixture, z: torch.Tensor, t: float) -> torch.Tensor:
    """(empirical - exact) / (5 SE + 0.01) of E_p[r_k g] for k, g (see the module doc): [K, 6]."""
    proc = teacher.process
    phi, _ = proc.transition(0.0, t)
    comps, exact_means, exact_covs = [], [], []
    for k in range(teacher.num_components):
        mean = torch.stack([phi[0, 0] * teacher.means[k, 0], phi[1, 0] * teacher.means[k, 0]])
        cov = proc.marginal_cov(t, float(teacher.variances[k, 0]))
        comps.append(torch.distributions.MultivariateNormal(mean, cov).log_prob(z) + teacher.log_weights[k])
        exact_means.append(mean)
        exact_covs.append(cov)
    lp = torch.stack(comps, 1)
    r = torch.exp(lp - torch.logsumexp(lp, 1, keepdim=True))                   # [N, K]
    x, m = z[:, 0], z[:, 1]
    g = torch.stack([torch.ones_like(x), x, m, x * x, x * m, m * m], 1)        # [N, 6]
    vals = r[:, :, None] * g[:, None, :]                                       # [N, K, 6]
    emp, se = vals.mean(0), vals.std(0) / math.sqrt(len(z))
    exact = []
    for k, (mu, cov) in enumerate(zip(exact_means, exact_covs)):
        second = cov + torch.outer(mu, mu)
        w = float(teacher.log_weights[k].exp())
        exact.append(w * torch.stack([torch.tensor(1.0, dtype=torch.float64), mu[0], mu[1], second[0, 0],
                                      second[0, 1], second[1, 1]]))
    return (emp - torch.stack(exact)) / (5 * se + 0.01)


STOCHASTIC = [("augmented_euler_maruyama", {}), ("sscs", {}), ("noba", {}), ("roba", {}), ("sps_s", {}),
              ("csps_s", {}), ("csps_s", {"precondition": True, "lam": 0.5})]


@pytest.mark.parametrize("solver,opts", STOCHASTIC, ids=[f"{s}{'-' + str(o) if o else ''}" for s, o in STOCHASTIC])
def test_stochastic_samplers_match_the_exact_mixture(solver, opts):
    teacher = mixture_teacher()
    n = 2000
    z_T = teacher.process.sample_prior((n, 1), torch.Generator().manual_seed(0))
    ts = timesteps(VP_TIMES, 300, "time_uniform")
    z = solve(teacher, z_T, ts, solver=solver, generator=torch.Generator().manual_seed(1), **opts)
    gaps = moment_gaps(teacher, z, T_END)
    assert float(gaps.abs().max()) < 1.0, gaps
    if solver == "sscs":                          # the statistic catches wrong samplers (half noise: all > 10 here)
        g = torch.Generator().manual_seed(1)
        half = solve(teacher, z_T, ts, solver=solver, noise_sampler=lambda s, t: 0.5 * torch.randn(
            z_T.shape, generator=g, dtype=torch.float64))
        assert float(moment_gaps(teacher, half, T_END).abs().max()) > 3.0

        class Flipped:
            augmented, process = True, teacher.process
            eps = staticmethod(lambda z, t: -teacher.eps(z, t))
            score = staticmethod(lambda z, t: -teacher.score(z, t))
        wrong = solve(Flipped(), z_T, ts, solver=solver, generator=torch.Generator().manual_seed(1))
        assert float(moment_gaps(teacher, wrong, T_END).abs().max()) > 3.0


def test_exact_draws_pass_the_statistic():
    teacher = mixture_teacher()
    g = torch.Generator().manual_seed(5)
    z0 = teacher.sample_data(4000, g)
    phi, q = teacher.process.transition(0.0, T_END)
    z = z0 @ phi.T + torch.randn(4000, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(q).T
    assert float(moment_gaps(teacher, z, T_END).abs().max()) < 1.0


def test_sscs_denoising_step_is_the_noise_free_reverse_step():
    teacher = mixture_teacher()
    z_T = teacher.process.sample_prior((5, 1), torch.Generator().manual_seed(0))
    ts = timesteps(VP_TIMES, 20, "time_uniform")
    assert nfe("sscs", 20, denoise_to_zero=True) == 21 and steps_for_nfe("sscs", 21, denoise_to_zero=True) == 20
    end = solve(teacher, z_T, ts, solver="sscs", generator=torch.Generator().manual_seed(3))
    out = solve(teacher, z_T, ts, solver="sscs", generator=torch.Generator().manual_seed(3), denoise_to_zero=True)
    proc = teacher.process
    drift = apply(proc.drift(T_END), end, 2) - apply(proc.diffusion(T_END), teacher.score(end, T_END), 2)
    assert torch.allclose(out, end - T_END * drift, rtol=0, atol=1e-12)


# --- 4. costs and bad input -------------------------------------------------------------------------

def test_costs():
    assert {s: nfe(s, 10) for s in ("nvv", "rvv", "noba", "roba", "csps_d", "sps_s", "csps_s", "sscs")} == \
        {"nvv": 30, "rvv": 11, "noba": 20, "roba": 10, "csps_d": 11, "sps_s": 11, "csps_s": 11, "sscs": 10}
    assert steps_for_nfe("rvv", 20) == 19 and steps_for_nfe("noba", 20) == 10


def test_registry_lists_the_psld_samplers():
    assert set(available("augmented")) == {"augmented_euler", "augmented_euler_maruyama", "lambda_ddim", "sscs",
                                           "nvv", "rvv", "noba", "roba", "csps_d", "sps_s", "csps_s"}


def test_bad_input_is_one_line():
    teacher = mixture_teacher()
    z = torch.zeros(2, 2, dtype=torch.float64)
    gmm = GaussianMixture(torch.zeros(1, 2), torch.ones(1), schedule=VP_TIMES)
    scalar = as_augmented(gmm)
    for call, match in [
        (lambda: solve(scalar, z, [1.0, 0.5], solver="rvv"), "rvv.*needs a process.*PSLD"),
        (lambda: solve(scalar, z, [1.0, 0.5], solver="sscs"), "sscs.*needs a process.*PSLD"),
        (lambda: solve(teacher, z, [1.0, 0.5], solver="csps_d", lam=math.nan), "lam=nan must be a finite"),
        (lambda: solve(teacher, z, [1.0, 0.5], solver="csps_s", precondition="yes"), "precondition='yes'"),
        (lambda: solve(teacher, z, [1.0, 0.5], solver="lambda_ddim", variant="III"), "variant='III'"),
        (lambda: solve(teacher, z, [1.0, 0.5], solver="lambda_ddim", lam=float("inf")), "lam=inf"),
        (lambda: solve(teacher, z, [1.0, 0.5], solver="nvv", lam=1.0), "no option 'lam'"),
        (lambda: solve(gmm, z, [1.0, 0.5], solver="roba"), "augmented process"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(UserError):
        solve(scalar, z, [1.0, 0.5], solver="nvv")
