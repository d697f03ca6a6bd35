"""Convergence against exact oracles (float64, linear VP, t_end = 1e-3).

1. Single Gaussian (closed-form ODE solution): the observed order of every solver / variant /
   order, from the errors at 20, 40, 80, 160 steps (asserted on the slope of the last doubling,
   the most asymptotic one; every doubling must lower the error). Expected orders are what the
   theory says, with three documented effects:
   - superconvergence: on the logSNR grid the third-order multisteps whose weights are exact
     for quadratic f (DPM-Solver++ 3M corrected, UniP-3 = 3M, log-rho DEIS-3) show ~3.9 on this
     problem (the h^3 error term nearly cancels); asserted >= 2.8, and ~3 on the time-quadratic grid;
   - iPNDM's fixed Adams-Bashforth weights are exact only on a grid uniform in rho = sigma/alpha:
     order 2 on the logSNR grid for every order >= 2, order p on a uniform-rho grid;
   - lower-order warm-up steps: a multistep method's first steps are of lower order, so at
     very many steps (~1000+, error ~1e-9 here) every multistep method falls to order 2, and
     order-4 multisteps on the time-quadratic grid (large first steps in log-SNR) show ~3.5
     (the second, second-order step); the fast DPM-Solver mix ends with a first-order step.
2. Gaussian mixture: a 2,000-step third-order reference agrees with scipy's DOP853 (rtol 1e-10)
   on the PF-ODE in t, and every ODE solver's error falls with the steps (12, 24, 48: at least
   4x lower at 4x the steps; this mixture has variances down to 0.02, and some methods, e.g. 3S,
   are still pre-asymptotic there).
3. SDE solvers, weak order: on the single Gaussian every step is affine in the state and the
   noise, so the exact mean and variance of the output follow from a few runs with a
   controlled `noise_sampler`; DDPM is weak order 1, SDE-DPM-Solver++ 2M weak order 2.
"""

import math

import pytest
import torch
from scipy.integrate import solve_ivp

from dsno.schedules import VPSchedule
from dsno.solvers import available, get, solve, timesteps
from dsno.teachers import GaussianMixture

T_END = 1e-3
STEPS = (20, 40, 80, 160)



def single_gaussian(d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, d, generator=g, dtype=torch.float64) * 0.5
    var = torch.exp(torch.linspace(math.log(0.05), 0.0, d, dtype=torch.float64))[None]   # 0.05 .. 1
    return GaussianMixture(mean, var, schedule=VPSchedule.linear()), torch.randn(4, d, generator=g, dtype=torch.float64)


TEACHER, X_T = single_gaussian()


def errors(solver, order, opts, spacing="logsnr", steps=STEPS, t_start=1.0, t_end=T_END, **grid):
    x_start = TEACHER.ode_solution(X_T, 1.0, t_start) if t_start != 1.0 else X_T
    exact = TEACHER.ode_solution(X_T, 1.0, t_end)
    out = []
    for n in steps:
        ts = timesteps(TEACHER.schedule, n, spacing, t_start=t_start, t_end=t_end, **grid)
        out.append(float((solve(TEACHER, x_start, ts, solver=solver, order=order, **opts) - exact).abs().max()))
    return out


def check_order(errs, steps, expected, at_least):
    slope = math.log(errs[-2] / errs[-1]) / math.log(steps[-1] / steps[-2])
    trace = f"errors {['%.2e' % e for e in errs]}, observed order {slope:.2f}"
    assert all(a > b for a, b in zip(errs, errs[1:])), trace
    if at_least:
        assert slope >= expected - 0.2, trace
    else:
        assert abs(slope - expected) <= 0.3, trace


# (solver, order, options, expected order, ">=" or "~")
LOGSNR = [
    ("ddim", 1, {}, 1, "~"), ("euler", 1, {}, 1, "~"), ("euler", 1, {"space": "t"}, 1, "~"),
    ("heun", 2, {}, 2, "~"), ("heun", 2, {"space": "t"}, 2, "~"),
    *[("deis", p, {"variant": v}, p, "~") for v in ("tab", "rhoab", "rhork") for p in (1, 2, 3, 4)],
    ("deis", 1, {"variant": "logrho"}, 1, "~"), ("deis", 2, {"variant": "logrho"}, 2, "~"),
    ("deis", 3, {"variant": "logrho"}, 3, ">="), ("deis", 4, {"variant": "logrho"}, 4, "~"),
    ("ipndm", 1, {}, 1, "~"), *[("ipndm", p, {}, 2, "~") for p in (2, 3, 4)],
    *[("dpm_solver", p, {}, p, "~") for p in (1, 2, 3)],
    ("dpm_solver_pp", 1, {}, 1, "~"), ("dpm_solver_pp", 2, {}, 2, "~"),
    ("dpm_solver_pp", 2, {"solver_type": "heun"}, 2, "~"),
    ("dpm_solver_pp", 3, {}, 3, ">="), ("dpm_solver_pp", 3, {"shipped_3m": True}, 2, "~"),
    *[("dpm_solver_pp", p, {"method": "singlestep"}, p, "~") for p in (1, 2, 3)],
    *[("unipc", p, {"variant": v}, p + 1, "~") for v in ("bh1", "bh2") for p in (1, 2, 3)],
    *[("unipc", p, {"variant": v, "use_corrector": False}, p, "~") for v in ("bh1", "bh2") for p in (1, 2)],
    *[("unipc", 3, {"variant": v, "use_corrector": False}, 3, ">=") for v in ("bh1", "bh2")],
    *[("unipc", p, {"predict_x0": False}, p + 1, "~") for p in (1, 2, 3)],
]


def case_id(c):
    return f"{c[0]}-{c[1]}" + "".join(f"-{k}={v}" for k, v in c[2].items())


@pytest.mark.parametrize("solver,order,opts,expected,kind", LOGSNR, ids=[case_id(c) for c in LOGSNR])
def test_observed_order_on_logsnr_grid(solver, order, opts, expected, kind):
    check_order(errors(solver, order, opts), STEPS, expected, kind == ">=")


TIME_QUADRATIC = [
    *[("deis", p, {"variant": v}, p, "~") for v in ("tab", "logrho", "rhoab", "rhork") for p in (1, 2, 3)],
    *[("deis", 4, {"variant": v}, 3.2, ">=") for v in ("tab", "logrho", "rhoab")],
    ("deis", 4, {"variant": "rhork"}, 4, "~"),
    ("dpm_solver_pp", 3, {}, 3, "~"),
]


@pytest.mark.parametrize("solver,order,opts,expected,kind", TIME_QUADRATIC, ids=[case_id(c) for c in TIME_QUADRATIC])
def test_observed_order_on_time_quadratic_grid(solver, order, opts, expected, kind):
    check_order(errors(solver, order, opts, spacing="time_quadratic"), STEPS, expected, kind == ">=")


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_reaches_its_order_on_a_grid_uniform_in_rho(order):
    steps = (80, 160, 320, 640)
    errs = errors("ipndm", order, {}, "karras", steps, t_start=0.6, t_end=0.05, rho=1.0)
    check_order(errs, steps, order, False)


@pytest.mark.parametrize("solver", ["dpm_solver", "dpm_solver_pp"])
def test_fast_mix_converges(solver):
    # NFE budgets, all = 0 mod 3: orders 3, ..., 3, 2, 1 on outer steps equal in log-SNR; the last,
    # first-order step is as long as the others, so order 2 shows from about 200 NFE on
    steps = (48, 96, 192, 384)
    check_order(errors(solver, 3, {"method": "fast"}, steps=steps), steps, 2, True)
    check_order(errors(solver, 3, {"method": "fast", "fast_outer": "grid"}, steps=steps[:3]), steps[:3], 2, True)
    steps = (20, 40, 80, 160)                              # even budgets: all steps second order
    check_order(errors(solver, 2, {"method": "fast"}, steps=steps), steps, 2, False)


def test_corrected_3m_beats_shipped_3m():
    corrected = errors("dpm_solver_pp", 3, {})
    shipped = errors("dpm_solver_pp", 3, {"shipped_3m": True})
    assert corrected[1] < 0.2 * shipped[1] and corrected[-1] < 0.02 * shipped[-1]


# --- Gaussian mixture oracle -----------------------------------------------------------------

def mixture():
    g = torch.Generator().manual_seed(0)
    k, d = 4, 8
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.8
    variances = 0.02 + 0.2 * torch.rand(k, d, generator=g, dtype=torch.float64)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, variances, weights, schedule=VPSchedule.linear()), \
        torch.randn(4, d, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def mixture_reference():
    teacher, x_T = mixture()
    sched = teacher.schedule

    def pf_ode(t, y):                                        # dx/dt = f(t) (x - eps / sigma)
        x = torch.from_numpy(y).reshape(x_T.shape)
        f, s = float(sched.d_log_alpha_dt(t)), float(sched.sigma(t))
        return (f * (x - teacher.eps(x, t) / s)).reshape(-1).numpy()

    sol = solve_ivp(pf_ode, (1.0, T_END), x_T.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-12)
    assert sol.status == 0
    scipy_ref = torch.from_numpy(sol.y[:, -1]).reshape(x_T.shape)
    ours = solve(teacher, x_T, timesteps(sched, 2000), solver="dpm_solver_pp", order=3)
    return teacher, x_T, ours, scipy_ref


def test_reference_agrees_with_scipy_dop853(mixture_reference):
    _, _, ours, scipy_ref = mixture_reference
    assert float((ours - scipy_ref).abs().max()) < 1e-7


MIXTURE = [
    ("ddim", 1, {}), ("euler", 1, {"space": "t"}), ("heun", 2, {}), ("heun", 2, {"space": "t"}),
    *[("deis", 3, {"variant": v}) for v in ("tab", "logrho", "rhoab", "rhork")],
    *[("ipndm", p, {}) for p in (2, 4)],
    *[("dpm_solver", p, {}) for p in (2, 3)], ("dpm_solver", 3, {"method": "fast"}),
    *[("dpm_solver_pp", p, {}) for p in (2, 3)], ("dpm_solver_pp", 3, {"shipped_3m": True}),
    ("dpm_solver_pp", 2, {"method": "singlestep"}), ("dpm_solver_pp", 3, {"method": "fast"}),
    *[("unipc", p, {"variant": v}) for v in ("bh1", "bh2") for p in (2, 3)],
]


def test_mixture_cases_cover_every_ode_solver():
    # usf carries its own grid (a solver schedule); tests/test_usf.py checks it against these solvers
    assert {c[0] for c in MIXTURE} == {n for n in available() if not get(n).stochastic and get(n).grid is None}


@pytest.mark.parametrize("solver,order,opts", MIXTURE, ids=[case_id(c) for c in MIXTURE])
def test_every_solver_converges_to_the_mixture_reference(mixture_reference, solver, order, opts):
    teacher, x_T, ref, _ = mixture_reference
    steps = (12, 24, 48)
    errs = [float((solve(teacher, x_T, timesteps(teacher.schedule, n), solver=solver, order=order, **opts)
                   - ref).abs().max()) for n in steps]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.25 * errs[0], errs


# --- SDE solvers: exact weak error on the single Gaussian ------------------------------------

def weak_error(solver, order, opts, steps):
    """max |mean - exact| + max |var - exact| of the output at t_end, per dimension, exactly."""
    sched = TEACHER.schedule
    ts = timesteps(sched, steps)
    index = {float(t): i for i, t in enumerate(ts)}
    mean_T = float(sched.alpha(1.0)) * TEACHER.means[0]
    var_T = float(sched.alpha(1.0)) ** 2 * TEACHER.variances[0] + float(sched.sigma(1.0)) ** 2
    rows = steps + 2                              # mean run, unit start, one unit noise per step
    x = mean_T.expand(rows, -1).clone()
    x[1] += 1.0

    def unit_noise(s, t):
        z = torch.zeros(rows, x.shape[1], dtype=torch.float64)
        z[2 + index[s]] = 1.0
        return z

    out = solve(TEACHER, x, ts, solver=solver, order=order, noise_sampler=unit_noise, **opts)
    gain, kicks = out[1] - out[0], out[2:] - out[0]
    var = gain**2 * var_T + (kicks**2).sum(0)
    a, s = float(sched.alpha(T_END)), float(sched.sigma(T_END))
    return float((out[0] - a * TEACHER.means[0]).abs().max() + (var - (a**2 * TEACHER.variances[0] + s**2)).abs().max())


SDE = [("ddpm", 1, {}, 1), ("sde_dpm_solver_pp", 1, {}, 1), ("sde_dpm_solver_pp", 2, {}, 2),
       ("sde_dpm_solver_pp", 2, {"solver_type": "heun"}, 2), ("ddim", 1, {"eta": 0.5}, 1)]


@pytest.mark.parametrize("solver,order,opts,expected", SDE, ids=[case_id(c) for c in SDE])
def test_weak_order_of_stochastic_solvers(solver, order, opts, expected):
    errs = [weak_error(solver, order, opts, n) for n in STEPS]
    check_order(errs, STEPS, expected, False)
