"""dsno.solvers: grids, registry and NFE accounting, trajectories, teachers of every kind, and
exact identities between solvers (float64, tiny Gaussian-mixture teachers)."""

import math

import numpy as np
import pytest
import torch

from dsno.schedules import VPSchedule
from dsno.solvers import available, from_grid, get, nfe, solve, steps_for_nfe, timesteps
from dsno.solvers.coefficients import fast_orders, lagrange_kernel_weights, phi
from dsno.solvers.core import step_orders
from dsno.solvers.dpm_solver import dynamic_threshold
from dsno.teachers import GaussianMixture, Teacher, wrap



def mixture(schedule=None, k=3, shape=(2, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, *shape, generator=g, dtype=torch.float64) * 0.7
    variances = 0.05 + 0.3 * torch.rand(k, *shape, generator=g, dtype=torch.float64)
    return GaussianMixture(means, variances, schedule=schedule or VPSchedule.linear())


def noise(shape=(3, 2, 2, 2), seed=1, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Counting(Teacher):
    """Counts model evaluations of an inner teacher."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.schedule, self.prediction, self.calls = inner, inner.schedule, inner.prediction, 0

    def forward(self, x, t):
        self.calls += 1
        return self.inner(x, t)


# Every solver configuration worth a separate code path: (solver, order, options).
CONFIGS = [
    ("ddim", 1, {}), ("ddim", 1, {"eta": 0.5}), ("euler", 1, {}), ("euler", 1, {"space": "t"}),
    ("heun", 2, {}), ("heun", 2, {"space": "t"}),
    *[("deis", o, {"variant": v}) for v in ("tab", "logrho", "rhoab", "rhork") for o in (1, 2, 3, 4)],
    *[("ipndm", o, {}) for o in (1, 2, 3, 4)],
    *[("dpm_solver", o, {}) for o in (1, 2, 3)],
    *[("dpm_solver", o, {"method": "fast"}) for o in (1, 2, 3)],
    *[("dpm_solver_pp", o, {}) for o in (1, 2, 3)],
    ("dpm_solver_pp", 2, {"solver_type": "heun"}), ("dpm_solver_pp", 3, {"shipped_3m": True}),
    ("dpm_solver_pp", 3, {"thresholding": True, "max_val": 1.5}),
    *[("dpm_solver_pp", o, {"method": m}) for m in ("singlestep", "fast") for o in (1, 2, 3)],
    *[("unipc", o, {"variant": v, "use_corrector": c})
      for v in ("bh1", "bh2") for o in (1, 2, 3) for c in (True, False)],
    ("unipc", 3, {"predict_x0": False}),
    ("ddpm", 1, {}), ("sde_dpm_solver_pp", 1, {}), ("sde_dpm_solver_pp", 2, {}),
    ("sde_dpm_solver_pp", 2, {"solver_type": "heun"}),
]
ODE_CONFIGS = [c for c in CONFIGS if not get(c[0]).stochastic and not c[2].get("eta")]
TRAJECTORY_CONFIGS = [c for c in CONFIGS if c[2].get("method") != "fast"]


def config_id(c):
    return f"{c[0]}-{c[1]}" + "".join(f"-{k}={v}" for k, v in c[2].items())


def test_return_trajectory_indices_are_checked():
    teacher, x_T = mixture(), noise()
    ts = timesteps(teacher.schedule, 4)
    for bad in ([], [1, 1], [-1], [0.5], "all"):
        with pytest.raises(ValueError, match="return_trajectory must be True, False or a non-empty list"):
            solve(teacher, x_T, ts, solver="ddim", return_trajectory=bad)
    with pytest.raises(ValueError, match="asked for grid indices up to 9, but the solve has 5 states"):
        solve(teacher, x_T, ts, solver="ddim", return_trajectory=[0, 9])


def test_available_lists_every_required_solver_sorted():
    names = available()
    assert names == sorted(names)
    for name in ("ddim", "deis", "ipndm", "dpm_solver", "dpm_solver_pp", "unipc", "euler", "heun", "ddpm",
                 "sde_dpm_solver_pp"):
        assert name in names


# --- grids -----------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [VPSchedule.linear(), VPSchedule.cosine(), VPSchedule.ddpm_linear()],
                         ids=["linear", "cosine", "ddpm"])
@pytest.mark.parametrize("spacing", ["time_uniform", "time_quadratic", "logsnr", "karras"])
def test_timesteps_spacings(schedule, spacing):
    ts = timesteps(schedule, steps=12, spacing=spacing, t_end=2e-3)
    assert ts.dtype == torch.float64 and ts.shape == (13,)
    assert float(ts[0]) == schedule.T and float(ts[-1]) == 2e-3
    assert bool((ts[1:] < ts[:-1]).all())
    if spacing == "time_uniform":
        d = ts[1:] - ts[:-1]
    elif spacing == "time_quadratic":
        d = ts[1:].sqrt() - ts[:-1].sqrt()
    elif spacing == "logsnr":
        lam = schedule.lam(ts)
        d = lam[1:] - lam[:-1]
    else:
        r = (schedule.sigma(ts) / schedule.alpha(ts)) ** (1 / 7)
        d = r[1:] - r[:-1]
    torch.testing.assert_close(d, torch.full_like(d, float(d.mean())), rtol=1e-6, atol=1e-9)


def test_timesteps_defaults_and_user_grids():
    s = VPSchedule.linear()
    ts = timesteps(s, 10)
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 1e-3 and len(ts) == 11
    sig = s.sigma(ts) / s.alpha(ts)
    torch.testing.assert_close(from_grid(s, sig, kind="sigma"), ts, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(from_grid(s, s.lam(ts), kind="lambda"), ts, rtol=1e-12, atol=1e-14)
    assert timesteps.from_grid is from_grid
    d = VPSchedule.ddpm_linear()
    torch.testing.assert_close(from_grid(d, [999, 499, 0], kind="index"),
                               torch.tensor([1.0, 0.5, 0.001], dtype=torch.float64))
    # a plain list is a grid too
    x = noise()
    t = mixture()
    torch.testing.assert_close(solve(t, x, [1.0, 0.5, 0.01], solver="ddim"),
                               solve(t, x, torch.tensor([1.0, 0.5, 0.01]), solver="ddim"))


# --- registry and NFE ------------------------------------------------------------------------

@pytest.mark.parametrize("denoise", [False, True], ids=["plain", "denoise"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_nfe_counts_the_model_evaluations(config, denoise):
    name, order, opts = config
    teacher = Counting(mixture())
    steps = 9
    ts = timesteps(teacher.schedule, steps)
    x = solve(teacher, noise(), ts, solver=name, order=order, denoise_to_zero=denoise,
               **({"generator": torch.Generator().manual_seed(0)} if "generator" in get(name).options else {}), **opts)
    assert teacher.calls == nfe(name, steps, order=order, denoise_to_zero=denoise, **opts)
    assert torch.isfinite(x).all()
    assert steps_for_nfe(name, teacher.calls, order=order, denoise_to_zero=denoise, **opts) == steps


def test_nfe_rules():
    assert nfe("heun", 10) == 20
    assert nfe("heun", 10, denoise_to_zero=True) == 21
    assert nfe("deis", 10, order=3, variant="rhork") == 30
    assert nfe("dpm_solver", 4, order=3) == 12
    assert nfe("dpm_solver", 10, order=3, method="fast") == 10
    assert nfe("unipc", 10, order=3) == 10
    assert steps_for_nfe("dpm_solver", 12, order=3) == 4
    assert steps_for_nfe("dpm_solver_pp", 7, order=2, method="singlestep", denoise_to_zero=True) == 3


def test_lower_order_final_rule():
    assert step_orders(3, 6, True) == [1, 2, 3, 3, 2, 1]
    assert step_orders(3, 6, True, extra_updates=1) == [1, 2, 3, 3, 3, 2]          # denoise_to_zero
    assert step_orders(3, 20, True) == [1, 2] + [3] * 18                           # >= 15 updates
    assert step_orders(3, 20, "always")[-3:] == [3, 2, 1]
    assert step_orders(4, 8, False) == [1, 2, 3, 4, 4, 4, 4, 4]


def test_fast_orders_spend_the_budget():
    for nfe_ in range(1, 40):
        for k in (1, 2, 3):
            orders = fast_orders(nfe_, k)
            assert sum(orders) == nfe_ and max(orders) <= k
    assert fast_orders(10, 3) == [3, 3, 3, 1]
    assert fast_orders(9, 3) == [3, 3, 2, 1]
    assert fast_orders(8, 3) == [3, 3, 2]
    assert fast_orders(7, 2) == [2, 2, 2, 1]


# --- pure math -------------------------------------------------------------------------------

@pytest.mark.parametrize("z", [-30.0, -3.0, -0.7, -1e-3, 1e-6, 0.5, 2.0])
def test_phi_functions(z):
    assert math.isclose(phi(0, z), math.exp(z), rel_tol=1e-15)
    assert math.isclose(phi(1, z), math.expm1(z) / z, rel_tol=1e-13)
    # phi_k(z) = int_0^1 e^{(1-s) z} s^{k-1} / (k-1)! ds, by Gauss-Legendre
    gx, gw = np.polynomial.legendre.leggauss(60)
    s = 0.5 * (gx + 1)
    for k in (2, 3, 4):
        ref = float(np.sum(0.5 * gw * np.exp((1 - s) * z) * s ** (k - 1) / math.factorial(k - 1)))
        assert math.isclose(phi(k, z), ref, rel_tol=1e-12)


def test_lagrange_kernel_weights_match_closed_forms():
    # log-rho DEIS-2 (diffusers' closed form, DEISMultistepScheduler.multistep_deis_second_order_update)
    rho_t, rho_s0, rho_s1 = 0.3, 0.8, 1.7

    def ind(t, b, c):
        return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))

    c = lagrange_kernel_weights([math.log(rho_s0), math.log(rho_s1)], math.log(rho_s0), math.log(rho_t), lambda u: u)
    assert math.isclose(c[0], ind(rho_t, rho_s0, rho_s1) - ind(rho_s0, rho_s0, rho_s1), rel_tol=1e-13)
    assert math.isclose(c[1], ind(rho_t, rho_s1, rho_s0) - ind(rho_s0, rho_s1, rho_s0), rel_tol=1e-13)
    # rho-AB: polynomials in rho integrate exactly, the weights sum to the step
    c = lagrange_kernel_weights([0.8, 1.7, 2.5], math.log(0.8), math.log(0.3), np.exp)
    assert math.isclose(sum(c), 0.3 - 0.8, rel_tol=1e-13)
    assert math.isclose(sum(w * n**2 for w, n in zip(c, [0.8, 1.7, 2.5])), (0.3**3 - 0.8**3) / 3, rel_tol=1e-12)


# --- trajectories, dtypes, teachers ----------------------------------------------------------

@pytest.mark.parametrize("config", TRAJECTORY_CONFIGS, ids=config_id)
def test_trajectory_matches_final_state(config):
    name, order, opts = config
    teacher = mixture()
    ts = timesteps(teacher.schedule, 6)
    x_T = noise()
    kw = dict(solver=name, order=order, **opts)
    seeded = (lambda: {"generator": torch.Generator().manual_seed(3)}) if "generator" in get(name).options else dict
    traj = solve(teacher, x_T, ts, return_trajectory=True, **seeded(), **kw)
    assert traj.shape == (len(ts), *x_T.shape)
    assert torch.equal(traj[0], x_T)
    torch.testing.assert_close(traj[-1], solve(teacher, x_T, ts, **seeded(), **kw), rtol=0, atol=1e-14)
    traj_dz = solve(teacher, x_T, ts, return_trajectory=True, denoise_to_zero=True, **seeded(), **kw)
    assert traj_dz.shape == (len(ts) + 1, *x_T.shape)
    # keeping only some grid indices gives exactly those states (and holds no others)
    kept = solve(teacher, x_T, ts, return_trajectory=[5, 0, 2], **seeded(), **kw)
    torch.testing.assert_close(kept, traj[[0, 2, 5]], rtol=0, atol=0)
    x0 = teacher.x0(traj_dz[-2], ts[-1])
    if opts.get("thresholding"):
        x0 = dynamic_threshold(x0, 0.995, opts["max_val"])
    torch.testing.assert_close(traj_dz[-1], x0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("config", ODE_CONFIGS, ids=config_id)
def test_every_prediction_type_and_discrete_time_give_the_same_solve(config):
    name, order, opts = config
    sched = VPSchedule.ddpm_linear()
    gmm = mixture(sched)
    ts = timesteps(sched, 7)
    x_T = noise()
    ref = solve(gmm, x_T, ts, solver=name, order=order, **opts)
    n = sched.num_steps
    for kind in ("eps", "x0", "v"):
        def model(x, i, kind=kind):                  # a "network" fed DDPM step indices
            t = (i.double() + 1.0) / n
            return gmm.predict(x, t, kind)
        teacher = wrap(model, sched, prediction=kind, time_input="discrete")
        out = solve(teacher, x_T, ts, solver=name, order=order, **opts)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_float32_state_stays_float32_and_close_to_float64():
    teacher = mixture()
    ts = timesteps(teacher.schedule, 10)
    x64 = noise()
    for name, order in (("dpm_solver_pp", 3), ("unipc", 3), ("deis", 3), ("heun", 2)):
        y32 = solve(teacher, x64.float(), ts, solver=name, order=order)
        y64 = solve(teacher, x64, ts, solver=name, order=order)
        assert y32.dtype == torch.float32
        torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)


def test_stochastic_solvers_follow_the_generator():
    teacher = mixture()
    ts = timesteps(teacher.schedule, 5)
    x_T = noise()
    for name, opts in (("ddpm", {}), ("sde_dpm_solver_pp", {}), ("ddim", {"eta": 1.0})):
        a = solve(teacher, x_T, ts, solver=name, generator=torch.Generator().manual_seed(5), **opts)
        b = solve(teacher, x_T, ts, solver=name, generator=torch.Generator().manual_seed(5), **opts)
        c = solve(teacher, x_T, ts, solver=name, generator=torch.Generator().manual_seed(6), **opts)
        assert torch.equal(a, b) and not torch.allclose(a, c)


def test_thresholding_bounds_the_data_prediction():
    teacher = mixture()
    ts = timesteps(teacher.schedule, 8)
    x_T = noise() * 3.0
    out = solve(teacher, x_T, ts, solver="dpm_solver_pp", thresholding=True, ratio=0.9, max_val=1.2,
                 denoise_to_zero=True)
    plain = solve(teacher, x_T, ts, solver="dpm_solver_pp", denoise_to_zero=True)
    assert float(out.abs().max()) <= 1.0 + 1e-12 < float(plain.abs().max())


# --- identities between solvers --------------------------------------------------------------

def random_grid(schedule, n=9, seed=4):
    g = torch.Generator().manual_seed(seed)
    inner = torch.sort(torch.rand(n - 1, generator=g, dtype=torch.float64) * 0.9 + 0.01, descending=True).values
    return torch.cat([torch.tensor([1.0], dtype=torch.float64), inner, torch.tensor([1e-3], dtype=torch.float64)])


def test_first_order_methods_are_all_ddim():
    teacher = mixture()
    ts = random_grid(teacher.schedule)
    x_T = noise()
    ref = solve(teacher, x_T, ts, solver="ddim")
    same = [("euler", 1, {}), ("ipndm", 1, {}), ("dpm_solver", 1, {}), ("dpm_solver_pp", 1, {}),
            ("dpm_solver_pp", 1, {"method": "singlestep"}), ("unipc", 1, {"use_corrector": False}),
            ("unipc", 1, {"use_corrector": False, "predict_x0": False}),
            *[("deis", 1, {"variant": v}) for v in ("tab", "logrho", "rhoab", "rhork")]]
    for name, order, opts in same:
        torch.testing.assert_close(solve(teacher, x_T, ts, solver=name, order=order, **opts), ref,
                                   rtol=1e-12, atol=1e-12, msg=f"{name} {opts}")


def test_higher_order_identities():
    teacher = mixture()
    ts = random_grid(teacher.schedule)
    x_T = noise()

    def run(name, order, **o):
        return solve(teacher, x_T, ts, solver=name, order=order, **o)

    # EDM's Heun in sigma space is rhoRK-DEIS with two stages
    torch.testing.assert_close(run("heun", 2), run("deis", 2, variant="rhork"), rtol=1e-12, atol=1e-12)
    # UniP-3 solves the order conditions exactly: it is the (corrected) 3M, on any grid
    torch.testing.assert_close(run("unipc", 3, use_corrector=False), run("dpm_solver_pp", 3), rtol=1e-10, atol=1e-10)
    # UniP-2 (bh2, rho = 1/2) is DPM-Solver++ 2M
    torch.testing.assert_close(run("unipc", 2, use_corrector=False), run("dpm_solver_pp", 2), rtol=1e-12, atol=1e-12)
    # the fast mix of order 2 on an even NFE grid is singlestep DPM-Solver-2 on every other point
    grid = timesteps(teacher.schedule, 8)
    torch.testing.assert_close(solve(teacher, x_T, grid, solver="dpm_solver", order=2, method="fast"),
                               solve(teacher, x_T, grid[::2], solver="dpm_solver", order=2), rtol=1e-12, atol=1e-12)
    # the fast mix's outer steps are equal in log-SNR (DPM-Solver reference, k-diffusion), whatever
    # their order and the grid's interior points: NFE 9 of order 3 = steps of orders 3, 3, 2, 1
    outer = timesteps(teacher.schedule, 4, t_start=float(ts[0]), t_end=float(ts[-1]))
    x = x_T
    for i, k in enumerate((3, 3, 2, 1)):
        x = solve(teacher, x, outer[i:i + 2], solver="dpm_solver", order=k)
    nine = torch.linspace(float(ts[0]), float(ts[-1]), 10, dtype=torch.float64)
    torch.testing.assert_close(solve(teacher, x_T, nine, solver="dpm_solver", order=3, method="fast"), x,
                               rtol=1e-10, atol=1e-10)
    grid_rule = solve(teacher, x_T, nine, solver="dpm_solver", order=3, method="fast", fast_outer="grid")
    assert not torch.allclose(grid_rule, x, rtol=1e-6)
    # the shipped 3M is not the corrected one
    assert not torch.allclose(run("dpm_solver_pp", 3), run("dpm_solver_pp", 3, shipped_3m=True), rtol=1e-6)


def test_ddpm_is_the_first_order_sde_solver_and_ddim_eta_one():
    teacher = mixture()
    ts = random_grid(teacher.schedule)
    x_T = noise()
    out = [solve(teacher, x_T, ts, solver=name, generator=torch.Generator().manual_seed(9), **o)
           for name, o in (("ddpm", {}), ("sde_dpm_solver_pp", {"order": 1}), ("ddim", {"eta": 1.0}))]
    torch.testing.assert_close(out[1], out[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[2], out[0], rtol=1e-10, atol=1e-10)
