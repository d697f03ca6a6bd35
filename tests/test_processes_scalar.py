"""Scalar linear processes beyond VP: VESchedule (EDM) and FlowSchedule (rectified flow).

1. The schedules' closed forms, inverses, derivatives and round trip; bad parameters refused.
2. The Gaussian-mixture teacher is exact for any (alpha_t, sigma_t): its denoiser is Tweedie's
   formula on an autograd score of its log-density, and the single-Gaussian ODE solution
   satisfies the probability-flow ODE dx/dt = f x + sigma (g - f) eps.
3. Convergence orders on VE and flow, against the exact single-Gaussian solution (float64,
   errors at 20, 40, 80, 160 steps, slope of the last doubling, as in test_solver_orders.py).
4. A flow teacher given VP times or asked for VP's v gets one clear line.
"""

import math

import pytest
import torch

import dsno
from dsno import FlowSchedule, VESchedule, VPSchedule
from dsno.errors import UserError
from dsno.processes import ProcessError, schedule_from_dict
from dsno.solvers import solve, timesteps
from dsno.teachers import GaussianMixture, wrap
from test_solver_orders import check_order

STEPS = (20, 40, 80, 160)
SCHEDULES = {"ve": VESchedule(), "flow": FlowSchedule()}


# --- 1. the schedules -------------------------------------------------------------------------

def test_closed_forms():
    ve, fl = VESchedule(0.002, 80.0), FlowSchedule()
    for t in (0.002, 0.5, 3.0, 80.0):
        assert float(ve.alpha(t)) == 1.0 and float(ve.sigma(t)) == t
        assert float(ve.lam(t)) == pytest.approx(-math.log(t), rel=1e-15, abs=1e-15)
    for t in (1e-5, 0.3, 0.5, 0.999):
        assert float(fl.alpha(t)) == pytest.approx(1 - t, rel=1e-15) and float(fl.sigma(t)) == t
        assert float(fl.lam(t)) == pytest.approx(math.log((1 - t) / t), rel=1e-12, abs=1e-15)
    assert (ve.t_min, ve.T) == (0.002, 80.0) and (fl.t_min, fl.T) == (1e-5, 0.999)
    assert ve.alpha(0.5).dtype == torch.float64 and fl.lam(torch.rand(3, 2)).shape == (3, 2)
    assert dsno.processes.VESchedule is VESchedule and dsno.processes.FlowSchedule is FlowSchedule


@pytest.mark.parametrize("name", ["ve", "flow"])
def test_inverse_and_derivatives(name):
    sched = SCHEDULES[name]
    t = torch.exp(torch.linspace(math.log(sched.t_min), math.log(sched.T), 200, dtype=torch.float64))
    assert torch.allclose(sched.t_of_lam(sched.lam(t)), t, rtol=1e-12, atol=0)
    a, s = sched.alpha_sigma_of_lam(sched.lam(t))
    assert torch.allclose(a, sched.alpha(t), rtol=1e-12) and torch.allclose(s, sched.sigma(t), rtol=1e-12)
    rho = sched.sigma(t) / sched.alpha(t)
    assert torch.allclose(sched.t_of_sigma_over_alpha(rho), t, rtol=1e-12)
    tm = t[20:-20]
    h = 1e-4 * tm
    fd_a = (sched.log_alpha(tm + h) - sched.log_alpha(tm - h)) / (2 * h)
    fd_s = (torch.log(sched.sigma(tm + h)) - torch.log(sched.sigma(tm - h))) / (2 * h)
    assert torch.allclose(sched.d_log_alpha_dt(tm), fd_a, rtol=1e-6, atol=1e-9)
    assert torch.allclose(sched.d_log_sigma_dt(tm), fd_s, rtol=1e-6)


def test_vp_new_methods_agree_with_its_own():
    sched = VPSchedule.linear()
    t = torch.linspace(1e-3, 1.0, 50, dtype=torch.float64)
    a, s = sched.alpha_sigma_of_lam(sched.lam(t))
    assert torch.allclose(a, sched.alpha(t), rtol=1e-12) and torch.allclose(s, sched.sigma(t), rtol=1e-12)
    h = 1e-6
    fd = (torch.log(sched.sigma(t[1:-1] + h)) - torch.log(sched.sigma(t[1:-1] - h))) / (2 * h)
    assert torch.allclose(sched.d_log_sigma_dt(t[1:-1]), fd, rtol=1e-6)


def test_round_trip_and_refusals():
    for s in (VESchedule(0.01, 50.0), FlowSchedule(0.99), VPSchedule.linear(), VPSchedule.ddpm_linear(100)):
        assert schedule_from_dict(s.to_dict()) == s
    assert VESchedule() != FlowSchedule() and VESchedule() == VESchedule(0.002, 80.0)
    for bad, match in [(lambda: VESchedule(1.0, 0.5), "sigma_min < sigma_max"),
                       (lambda: VESchedule(0.0, 80.0), "sigma_min must be a finite number > 0"),
                       (lambda: VESchedule(0.002, math.inf), "sigma_max must be a finite number > 0"),
                       (lambda: FlowSchedule(1.0), "T < 1"),
                       (lambda: FlowSchedule(-0.5), "T must be a finite number > 0")]:
        with pytest.raises(ProcessError, match=match) as err:
            bad()
        assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_timesteps_on_each_schedule():
    ve = timesteps(VESchedule(), 10)
    assert float(ve[0]) == 80.0 and float(ve[-1]) == 0.002                  # t_end defaults to sigma_min
    lam = VESchedule().lam(ve)
    assert torch.allclose(lam[1:] - lam[:-1], (lam[-1] - lam[0]) / 10 * torch.ones(10, dtype=torch.float64))
    kar = timesteps(VESchedule(), 10, "karras")                            # EDM's sigmas, t = sigma
    i = torch.arange(11, dtype=torch.float64)
    edm = (80.0 ** (1 / 7) + i / 10 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert torch.allclose(kar, edm, rtol=1e-12)
    for spacing in ("time_uniform", "time_quadratic", "logsnr", "karras"):
        fl = timesteps(FlowSchedule(), 8, spacing)
        assert float(fl[0]) == 0.999 and float(fl[-1]) == 1e-3 and bool((fl[1:] < fl[:-1]).all())
    assert float(timesteps(VPSchedule.linear(), 4)[-1]) == 1e-3                   # VP unchanged


# --- 2. the exact teacher on any scalar process -----------------------------------------------

def mixture(schedule, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 6, generator=g, dtype=torch.float64)
    variances = 0.05 + 0.3 * torch.rand(3, 6, generator=g, dtype=torch.float64)
    return GaussianMixture(means, variances, torch.tensor([0.2, 0.5, 0.3]), schedule=schedule)


@pytest.mark.parametrize("name", ["ve", "flow"])
def test_mixture_denoiser_is_tweedie(name):
    sched = SCHEDULES[name]
    gmm = mixture(sched)
    # from t = 1e-3 on: score = -eps / sigma carries an error of about eps_mach |x| / sigma^2
    for t in (max(5 * sched.t_min, 1e-3), 0.3 * sched.T, 0.9 * sched.T):
        a, s = float(sched.alpha(t)), float(sched.sigma(t))
        x = a * gmm.sample_data(5, torch.Generator().manual_seed(1)) + s * torch.randn(5, 6, dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(gmm.log_prob(xr, t).sum(), xr)
        assert torch.allclose(gmm.x0(x, t), (x + s**2 * score) / a, rtol=1e-9, atol=1e-9 * max(1.0, s))
        assert torch.allclose(gmm.score(x, t), score, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["ve", "flow"])
def test_single_gaussian_solution_solves_the_pf_ode(name):
    sched = SCHEDULES[name]
    gmm, x_T = single_gaussian(sched)
    for t in (0.01 * sched.T, 0.5 * sched.T):
        h = 1e-6 * t
        x = gmm.ode_solution(x_T, sched.T, t)
        fd = (gmm.ode_solution(x_T, sched.T, t + h) - gmm.ode_solution(x_T, sched.T, t - h)) / (2 * h)
        f, g, s = float(sched.d_log_alpha_dt(t)), float(sched.d_log_sigma_dt(t)), float(sched.sigma(t))
        drift = f * x + s * (g - f) * gmm.eps(x, t)
        assert torch.allclose(fd, drift, rtol=1e-6, atol=1e-8)
    back = gmm.ode_solution(gmm.ode_solution(x_T, sched.T, 0.01 * sched.T), 0.01 * sched.T, sched.T)
    assert torch.allclose(back, x_T, rtol=1e-12)


# --- 3. convergence orders on VE and flow -----------------------------------------------------

def single_gaussian(schedule, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, d, generator=g, dtype=torch.float64) * 0.5
    var = torch.exp(torch.linspace(math.log(0.05), 0.0, d, dtype=torch.float64))[None]
    teacher = GaussianMixture(mean, var, schedule=schedule)
    x_T = float(schedule.sigma(schedule.T)) * torch.randn(4, d, generator=g, dtype=torch.float64)
    return teacher, x_T


def errors(teacher, x_T, solver, order, opts, spacing="logsnr", steps=STEPS, **grid):
    sched = teacher.schedule
    out = []
    for n in steps:
        ts = timesteps(sched, n, spacing, **grid)
        exact = teacher.ode_solution(x_T, sched.T, float(ts[-1]))
        got = solve(teacher, x_T, ts, solver=solver, order=order, **opts)
        out.append(float(((got - exact) / exact.abs().clamp(min=1.0)).abs().max()))
    return out


CASES = [
    ("ddim", 1, {}, 1, "~"), ("dpm_solver_pp", 2, {}, 2, "~"), ("dpm_solver_pp", 3, {}, 3, ">="),
    ("dpm_solver_pp", 2, {"method": "singlestep"}, 2, "~"),
    *[("dpm_solver", p, {}, p, "~") for p in (1, 2, 3)],
    ("deis", 3, {"variant": "tab"}, 3, "~"), ("deis", 3, {"variant": "rhork"}, 3, "~"),
    ("unipc", 2, {}, 3, "~"), ("ipndm", 2, {}, 2, "~"),
    ("euler", 1, {"space": "t"}, 1, "~"), ("heun", 2, {}, 2, "~"),
]


@pytest.mark.parametrize("name", ["ve", "flow"])
@pytest.mark.parametrize("solver,order,opts,expected,kind", CASES,
                         ids=[f"{c[0]}-{c[1]}" + "".join(f"-{v}" for v in c[2].values()) for c in CASES])
def test_observed_order(name, solver, order, opts, expected, kind):
    teacher, x_T = single_gaussian(SCHEDULES[name])
    check_order(errors(teacher, x_T, solver, order, opts), STEPS, expected, kind == ">=")


def test_flow_velocity_teacher_samples_the_same_ode():
    gmm, x_T = single_gaussian(FlowSchedule())
    teacher = wrap(gmm.flow_velocity, FlowSchedule(), prediction="flow_velocity")
    t = 0.4
    x = gmm.ode_solution(x_T, 0.999, t)
    eps, x0 = gmm.eps(x, t), gmm.x0(x, t)
    assert torch.allclose(teacher(x, torch.full((4,), t, dtype=torch.float64)), eps - x0, rtol=1e-12)
    assert torch.allclose(teacher.x0(x, t), x0, rtol=1e-12) and torch.allclose(teacher.eps(x, t), eps, rtol=1e-12)
    ts = timesteps(teacher.schedule, 40)
    got = solve(teacher, x_T, ts, solver="dpm_solver_pp", order=3)
    assert torch.allclose(got, solve(gmm, x_T, ts, solver="dpm_solver_pp", order=3), rtol=1e-10, atol=1e-12)
    assert float((got - gmm.ode_solution(x_T, 0.999, 1e-3)).abs().max()) < 2e-3


# --- 4. one clear line for VP-style use of a flow teacher -------------------------------------

def one_line_error(fn, match, kind=ValueError):
    with pytest.raises(kind, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_flow_teacher_refuses_vp_times_and_vp_velocity():
    gmm = mixture(FlowSchedule())
    x = torch.randn(2, 6, dtype=torch.float64)
    one_line_error(lambda: gmm.eps(x, 1.0), r"takes t in \[0, 1\)", UserError)
    one_line_error(lambda: gmm.x0(x, torch.tensor([0.5, 1.5])), r"takes t in \[0, 1\).*VP times", UserError)
    one_line_error(lambda: gmm.v(x, 0.5), "prediction 'v' is VP's velocity.*flow_velocity", UserError)
    vp_grid = timesteps(VPSchedule.linear(), 10)                           # starts at t = 1
    one_line_error(lambda: solve(gmm, x, vp_grid, solver="ddim"), r"ts\[0\] = 1 lies outside .*FlowSchedule")
    one_line_error(lambda: wrap(gmm.flow_velocity, VPSchedule.linear(), prediction="flow_velocity"),
                   "needs dsno.FlowSchedule", UserError)
    one_line_error(lambda: mixture(VPSchedule.linear()).flow_velocity(x, 0.5), "needs dsno.FlowSchedule", UserError)
    one_line_error(lambda: mixture(VESchedule()).eps(x, -1.0), "noise levels t = sigma > 0", UserError)
