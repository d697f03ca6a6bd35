"""Samplers of augmented diffusions (dsno.solvers.psld), float64.

1. lambda-DDIM with lam = 0 on a scalar teacher (viewed as k = 1) is DDIM, to 1e-10 (VP, VE, flow).
2. With a constant eps the lam = 0 step is the exact PF-ODE solution (checks C_e's quadrature).
3. On PSLD (the CIFAR-10 setting) with a Gaussian-mixture teacher, Euler and lambda-DDIM converge at
   order 1 to a DOP853 reference (rtol 1e-12) of the augmented PF-ODE; both need hundreds of
   steps there (PSLD's PF-ODE is stiff near t = 0, and lambda-DDIM with these lam is no better
   than Euler on this problem).
4. Euler-Maruyama is weak order 1: on a single Gaussian every step is affine in (z, noise), so the
   output's exact mean and covariance follow from probing each step with unit inputs.
5. The registry keeps augmented solvers apart and says so in one line.
"""

import math

import pytest
import torch
from scipy.integrate import solve_ivp

import dsno
from dsno.processes import PSLD
from dsno.solvers import available, solve, timesteps
from dsno.solvers.psld import apply, as_augmented, lambda_ddim_weights
from dsno.teachers import GaussianMixture, PSLDGaussianMixture

T_END = 1e-3
VP_TIMES = dsno.VPSchedule.linear()                 # PSLD runs on t in [1e-5, 1]; its grids come from here


def check_order(errs, steps, expected):
    slope = math.log(errs[-2] / errs[-1]) / math.log(steps[-1] / steps[-2])
    trace = f"errors {['%.2e' % e for e in errs]}, observed order {slope:.2f}"
    assert all(a > b for a, b in zip(errs, errs[1:])), trace
    assert abs(slope - expected) <= 0.3, trace


# --- 1. lam = 0 is DDIM on scalar schedules ---------------------------------------------------

@pytest.mark.parametrize("schedule", [dsno.VPSchedule.linear(), dsno.VPSchedule.cosine(), dsno.VESchedule(),
                                      dsno.FlowSchedule()], ids=["vp-linear", "vp-cosine", "ve", "flow"])
@pytest.mark.parametrize("spacing", ["logsnr", "time_uniform", "time_quadratic"])
def test_lambda_ddim_at_zero_is_ddim(schedule, spacing):
    g = torch.Generator().manual_seed(0)
    gmm = GaussianMixture(torch.randn(3, 6, generator=g, dtype=torch.float64),
                          0.1 + 0.2 * torch.rand(3, 6, generator=g, dtype=torch.float64), schedule=schedule)
    x_T = float(schedule.sigma(schedule.T)) * torch.randn(4, 6, generator=g, dtype=torch.float64)
    ts = timesteps(schedule, 12, spacing)
    ddim = solve(gmm, x_T, ts, solver="ddim", return_trajectory=True)
    ours = solve(as_augmented(gmm), x_T, ts, solver="lambda_ddim", lam=0.0, return_trajectory=True)
    scale = ddim.abs().max()
    assert float((ours - ddim).abs().max() / scale) < 1e-10


def test_lambda_ddim_on_vp_converges_for_nonzero_lam():
    g = torch.Generator().manual_seed(1)
    gmm = GaussianMixture(torch.randn(1, 4, generator=g, dtype=torch.float64), torch.full((1,), 0.2), schedule=VP_TIMES)
    x_T = torch.randn(3, 4, generator=g, dtype=torch.float64)
    exact = gmm.ode_solution(x_T, 1.0, T_END)
    steps = (20, 40, 80, 160)
    for lam in (-2.0, 2.0):
        errs = [float((solve(as_augmented(gmm), x_T, timesteps(VP_TIMES, n), solver="lambda_ddim", lam=lam)
                       - exact).abs().max()) for n in steps]
        check_order(errs, steps, 1)


# --- 2. exact for a constant eps -------------------------------------------------------------

@pytest.mark.parametrize("process", [PSLD(), PSLD(gamma=0.0, nu=4.0), PSLD(0.1, 20.0, 3.0, 0.5)],
                         ids=["psld", "cld", "linear-beta"])
def test_lambda_ddim_step_is_exact_for_constant_eps(process):
    c = torch.tensor([0.7, -1.3], dtype=torch.float64)
    z_s = torch.tensor([0.4, 0.9], dtype=torch.float64)
    for s, t in ((1.0, 0.8), (0.3, 0.05), (0.02, T_END)):
        def pf_ode(u, y):                         # dz/du = beta F z + 1/2 beta D L^-T eps
            l_inv_t = torch.linalg.inv(process.kernel_cholesky(u)).T
            return (process.drift(u) @ torch.from_numpy(y) + 0.5 * process.diffusion(u) @ l_inv_t @ c).numpy()
        sol = solve_ivp(pf_ode, (s, t), z_s.numpy(), method="DOP853", rtol=1e-12, atol=1e-13)
        c_x, c_e = lambda_ddim_weights(process, s, t, 0.0)
        got = c_x @ z_s + c_e @ c
        assert torch.allclose(got, torch.from_numpy(sol.y[:, -1]), rtol=1e-9, atol=1e-11), (s, t)


# --- 3. convergence to a DOP853 reference on PSLD ----------------------------------------------

@pytest.fixture(scope="module")
def psld_reference():
    g = torch.Generator().manual_seed(0)
    proc = PSLD()
    teacher = PSLDGaussianMixture(torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
                                  0.05 + 0.3 * torch.rand(3, 2, 2, generator=g, dtype=torch.float64), process=proc)
    z_T = proc.sample_prior((4, 2, 2), g)

    def pf_ode(t, y):
        z = torch.from_numpy(y).reshape(z_T.shape)
        return (apply(proc.drift(t), z, 2) - 0.5 * apply(proc.diffusion(t), teacher.score(z, t), 2)).reshape(-1).numpy()

    sol = solve_ivp(pf_ode, (1.0, T_END), z_T.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.status == 0
    radau = solve_ivp(pf_ode, (1.0, T_END), z_T.reshape(-1).numpy(), method="Radau", rtol=1e-11, atol=1e-12)
    assert abs(radau.y[:, -1] - sol.y[:, -1]).max() < 1e-9                    # two integrators agree
    return teacher, z_T, torch.from_numpy(sol.y[:, -1]).reshape(z_T.shape)


@pytest.mark.parametrize("solver,opts,steps", [
    ("augmented_euler", {}, (200, 400, 800, 1600)),
    ("lambda_ddim", {"lam": 0.0}, (160, 320, 640, 1280)),
    ("lambda_ddim", {"lam": 1.0}, (160, 320, 640, 1280)),
], ids=["euler", "lambda_ddim-0", "lambda_ddim-1"])
def test_psld_ode_solvers_converge_at_order_one(psld_reference, solver, opts, steps):
    teacher, z_T, ref = psld_reference
    errs = [float((solve(teacher, z_T, timesteps(VP_TIMES, n, "time_uniform"), solver=solver, **opts) - ref)
                  .abs().max()) for n in steps]
    check_order(errs, steps, 1)


# --- 4. Euler-Maruyama, weak order 1 -----------------------------------------------------------

def em_weak_error(teacher: PSLDGaussianMixture, steps: int) -> float:
    """max |mean - exact| + max |cov - exact| of z at T_END, the 2x2 per pixel, from z_T ~ the exact marginal."""
    proc, d = teacher.process, teacher.means.shape[1]
    mu, v = teacher.means[0], teacher.variances[0]
    ts = timesteps(VP_TIMES, steps, "time_uniform")
    phi, _ = proc.transition(0.0, 1.0)
    mean = torch.cat([phi[0, 0] * mu, phi[1, 0] * mu])
    cov = proc.marginal_cov(1.0, v)                                      # [d, 2, 2]
    for s, t in zip(ts[:-1].tolist(), ts[1:].tolist()):
        z = mean.expand(5, -1).clone()
        z[1, :d] += 1.0
        z[2, d:] += 1.0
        unit = torch.zeros(5, 2 * d, dtype=torch.float64)
        unit[3, :d], unit[4, d:] = 1.0, 1.0
        out = solve(teacher, z, [s, t], solver="augmented_euler_maruyama", noise_sampler=lambda a, b: unit)
        cols = out - out[0]
        a = torch.stack([torch.stack([cols[1, :d], cols[1, d:]], -1), torch.stack([cols[2, :d], cols[2, d:]], -1)], -1)
        n = torch.stack([torch.stack([cols[3, :d], cols[3, d:]], -1), torch.stack([cols[4, :d], cols[4, d:]], -1)], -1)
        mean, cov = out[0], a @ cov @ a.transpose(-1, -2) + n @ n.transpose(-1, -2)
    phi, _ = proc.transition(0.0, T_END)
    exact_mean, exact_cov = torch.cat([phi[0, 0] * mu, phi[1, 0] * mu]), proc.marginal_cov(T_END, v)
    return float((mean - exact_mean).abs().max() + (cov - exact_cov).abs().max())


def test_euler_maruyama_weak_order_one():
    g = torch.Generator().manual_seed(1)
    teacher = PSLDGaussianMixture(torch.randn(1, 2, generator=g, dtype=torch.float64) * 0.5,
                                  torch.tensor([[0.05, 0.5]], dtype=torch.float64), process=PSLD())
    steps = (200, 400, 800, 1600)
    check_order([em_weak_error(teacher, n) for n in steps], steps, 1)


def test_euler_maruyama_draws_from_its_generator():
    teacher = PSLDGaussianMixture(torch.zeros(1, 2), torch.ones(1), process=PSLD())
    z_T = teacher.process.sample_prior((3, 2), torch.Generator().manual_seed(0))
    ts = timesteps(VP_TIMES, 50, "time_uniform")
    run = lambda seed: solve(teacher, z_T, ts, solver="augmented_euler_maruyama",  # noqa: E731
                              generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


# --- 5. the registry -------------------------------------------------------------------------

def test_registry_keeps_augmented_solvers_apart():
    assert {"augmented_euler", "augmented_euler_maruyama", "lambda_ddim"} <= set(available("augmented"))
    assert not set(available()) & set(available("augmented"))
    assert set(available(None)) == set(available()) | set(available("augmented"))
    teacher = PSLDGaussianMixture(torch.zeros(1, 2), torch.ones(1), process=PSLD())
    z = torch.zeros(2, 4, dtype=torch.float64)
    gmm = GaussianMixture(torch.zeros(1, 2), torch.ones(1))
    for call, match in [
        (lambda: solve(teacher, z, timesteps(VP_TIMES, 4), solver="ddim"), "ddim.*scalar diffusion.*augmented"),
        (lambda: solve(gmm, z[:, :2], timesteps(VP_TIMES, 4), solver="lambda_ddim"), "as_augmented"),
        (lambda: solve(teacher, z, [1.5, 0.5], solver="lambda_ddim"), r"ts\[0\] = 1.5 lies outside .*PSLD"),
        (lambda: solve(teacher, z[:, :3], [1.0, 0.5], solver="augmented_euler"), r"x_T must be .* shape \[B, 4\], got \(2, 3\)"),
        (lambda: solve(teacher, z, [1.0, 0.5], solver="lambda_ddim", lam=math.inf), "lam=inf must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("solver", ["augmented_euler", "augmented_euler_maruyama", "lambda_ddim"])
def test_state_keeps_its_dtype(solver):
    teacher = PSLDGaussianMixture(torch.zeros(1, 2), torch.ones(1), process=PSLD())
    z_T = teacher.process.sample_prior((3, 2), torch.Generator().manual_seed(0))
    ts = timesteps(VP_TIMES, 50, "time_uniform")
    opts = {"generator": torch.Generator().manual_seed(1)} if solver == "augmented_euler_maruyama" else {}
    low = solve(teacher, z_T.float(), ts, solver=solver, **opts)
    opts = {"generator": torch.Generator().manual_seed(1)} if opts else {}
    assert low.dtype == torch.float32
    assert float((low.double() - solve(teacher, z_T, ts, solver=solver, **opts)).abs().max()) < 1e-5
