"""Peer oracle: our solvers against diffusers' schedulers on the same eps-model and grid.

The model is an exact Gaussian mixture on the discrete DDPM schedule (betas 1e-4..0.02, 1000
steps), called by diffusers with integer timesteps i and by us through
`wrap(..., time_input="discrete")`; diffusers' timesteps map to our grid by t = (i + 1) / N
(`from_grid(kind="index")`). diffusers' final sigma 0 ("zero") is our `denoise_to_zero=True`
(one more evaluation); its "sigma_min" is one more grid point at t = 1/N. diffusers keeps
float32 sigmas; after `set_timesteps` we put the float64 sigmas of the same timesteps in, so
DEIS and UniPC run in float64 (agreement ~1e-15); DPMSolverMultistep casts the state to
float32 inside `step` and DDIM uses float32 alphas_cumprod (agreement ~1e-7).

Differences on purpose, each shown by a test: the corrected 3M (diffusers' 3M is our
`shipped_3m=True`), our default lower_order_final rule for UniPC (diffusers lowers the last
orders on grids of any length: our lower_order_final="always"), and UniPC bh1 with a final
sigma of 0 (NaN in diffusers).
"""

import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the peer oracle needs diffusers (a project dependency)")
from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       UniPCMultistepScheduler)

from dsno.schedules import VPSchedule  # noqa: E402
from dsno.solvers import from_grid, solve, timesteps  # noqa: E402
from dsno.teachers import GaussianMixture, wrap  # noqa: E402

SCHED = VPSchedule.ddpm_linear()
N = SCHED.num_steps
TOL = 1e-4



def _mixture():
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 2, 2)                     # K = 3 components of 2x2x2 "images"
    means = torch.randn(shape, generator=g, dtype=torch.float64) * 0.7
    variances = 0.05 + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)
    return GaussianMixture(means, variances, schedule=SCHED), \
        torch.randn(6, 2, 2, 2, generator=g, dtype=torch.float64) * 1.5


GMM, X_T = _mixture()


def eps_model(x, timestep):
    """An eps-prediction "network" taking DDPM step indices (what diffusers pipelines call)."""
    t = (torch.as_tensor(timestep, dtype=torch.float64) + 1.0) / N
    return GMM.eps(x.double(), t).to(x.dtype)


TEACHER = wrap(eps_model, SCHED, prediction="eps", time_input="discrete")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def diffusers_run(scheduler, steps, noises=None):
    """diffusers' sampling loop; returns (sample, our grid of its timesteps, its final sigma)."""
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps
    grid = from_grid(SCHED, ts, kind="index")
    if hasattr(scheduler, "sigmas"):
        sig = SCHED.sigma(grid) / SCHED.alpha(grid)
        last = 0.0 if float(scheduler.sigmas[-1]) == 0.0 else float(SCHED.sigma(1 / N) / SCHED.alpha(1 / N))
        scheduler.sigmas = torch.cat([sig, torch.tensor([last], dtype=torch.float64)])
    x = X_T.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, t in enumerate(ts):
            kw = {} if noises is None else {"variance_noise": noises[i]}
            x = scheduler.step(eps_model(x, t), t, x, **kw).prev_sample
    return x, grid, float(scheduler.sigmas[-1]) if hasattr(scheduler, "sigmas") else 0.0


def with_sigma_min(grid):
    return torch.cat([grid, torch.tensor([1.0 / N], dtype=torch.float64)])


@pytest.mark.parametrize("steps", [10, 20])
def test_ddim(steps):
    x, grid, _ = diffusers_run(DDIMScheduler(timestep_spacing="trailing", clip_sample=False), steps)
    assert rel(solve(TEACHER, X_T, grid, solver="ddim", denoise_to_zero=True), x) < TOL


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")])
def test_dpm_solver_pp_multistep(order, solver_type, steps):
    x, grid, _ = diffusers_run(DPMSolverMultistepScheduler(solver_order=order, solver_type=solver_type), steps)
    ours = solve(TEACHER, X_T, grid, solver="dpm_solver_pp", order=order, solver_type=solver_type,
                  shipped_3m=True, denoise_to_zero=True)
    assert rel(ours, x) < TOL


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_dynamic_thresholding(order):
    scheduler = DPMSolverMultistepScheduler(solver_order=order, thresholding=True, dynamic_thresholding_ratio=0.9,
                                            sample_max_value=1.5)
    x, grid, _ = diffusers_run(scheduler, 10)
    kw = dict(solver="dpm_solver_pp", order=order, shipped_3m=True, denoise_to_zero=True)
    assert rel(solve(TEACHER, X_T, grid, thresholding=True, ratio=0.9, max_val=1.5, **kw), x) < TOL
    assert rel(solve(TEACHER, X_T, grid, **kw), x) > 0.1          # thresholding matters here


@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun")])
def test_sde_dpm_solver_pp_with_the_same_noise(order, solver_type):
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(X_T.shape, generator=g, dtype=torch.float64) for _ in range(10)]
    scheduler = DPMSolverMultistepScheduler(solver_order=order, algorithm_type="sde-dpmsolver++",
                                            solver_type=solver_type)
    x, grid, _ = diffusers_run(scheduler, 10, noises)
    step_of = {float(t): i for i, t in enumerate(grid)}
    ours = solve(TEACHER, X_T, grid, solver="sde_dpm_solver_pp", order=order, solver_type=solver_type,
                  denoise_to_zero=True, noise_sampler=lambda s, t: noises[step_of[s]])
    assert rel(ours, x) < TOL


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc(variant, order):
    # bh1 with diffusers' default final sigma 0 is NaN there (test below): compare on sigma_min
    final = "zero" if variant == "bh2" else "sigma_min"
    x, grid, _ = diffusers_run(UniPCMultistepScheduler(solver_order=order, solver_type=variant,
                                                       final_sigmas_type=final), 10)
    kw = dict(solver="unipc", order=order, variant=variant)
    ours = solve(TEACHER, X_T, grid, denoise_to_zero=True, **kw) if final == "zero" else \
        solve(TEACHER, X_T, with_sigma_min(grid), **kw)
    assert rel(ours, x) < TOL


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_noise_prediction_and_without_corrector(order):
    x, grid, _ = diffusers_run(UniPCMultistepScheduler(solver_order=order, predict_x0=False,
                                                       final_sigmas_type="sigma_min"), 10)
    ours = solve(TEACHER, X_T, with_sigma_min(grid), solver="unipc", order=order, predict_x0=False)
    assert rel(ours, x) < TOL
    x, grid, _ = diffusers_run(UniPCMultistepScheduler(solver_order=order, disable_corrector=list(range(10))), 10)
    ours = solve(TEACHER, X_T, grid, solver="unipc", order=order, use_corrector=False, denoise_to_zero=True)
    assert rel(ours, x) < TOL


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_log_rho(order, steps):
    x, grid, _ = diffusers_run(DEISMultistepScheduler(solver_order=order), steps)
    ours = solve(TEACHER, X_T, with_sigma_min(grid), solver="deis", order=order, variant="logrho")
    assert rel(ours, x) < 1e-10                          # both float64


# --- where we differ on purpose ------------------------------------------------------------

def test_corrected_3m_differs_from_diffusers_and_converges_faster():
    """diffusers' 3M halves the second difference D2 (order 2); ours estimates h^2 x0'' (order 3)."""
    x, grid, _ = diffusers_run(DPMSolverMultistepScheduler(solver_order=3), 10)
    corrected = solve(TEACHER, X_T, grid, solver="dpm_solver_pp", order=3, denoise_to_zero=True)
    assert rel(corrected, x) > 10 * TOL
    reference = solve(TEACHER, X_T, timesteps(SCHED, 500), solver="dpm_solver_pp", order=3)
    err = {}
    for shipped in (False, True):
        err[shipped] = [rel(solve(TEACHER, X_T, timesteps(SCHED, n), solver="dpm_solver_pp", order=3,
                                   shipped_3m=shipped), reference) for n in (40, 80)]
    order_corrected, order_shipped = (np.log2(e[0] / e[1]) for e in (err[False], err[True]))
    assert err[False][0] < err[True][0] and err[False][1] < 0.5 * err[True][1]
    assert order_corrected > 2.8 and order_shipped < 2.3


def test_unipc_lower_order_final_rule():
    """diffusers' UniPC lowers the last orders on grids of any length (our lower_order_final="always");
    our default lowers them below 15 updates only (its rule for DPM-Solver++ and DEIS). On its
    time-uniform grid, whose last steps are long in log-SNR, lowering is more accurate; on a
    logSNR grid it changes nothing at 20 steps, and keeping the order is what the order tests measure."""
    x, grid, _ = diffusers_run(UniPCMultistepScheduler(solver_order=3), 20)
    kw = dict(solver="unipc", order=3, denoise_to_zero=True)
    always = solve(TEACHER, X_T, grid, lower_order_final="always", **kw)
    default = solve(TEACHER, X_T, grid, **kw)
    assert rel(always, x) < 1e-10 and rel(default, x) > 10 * TOL
    reference = solve(TEACHER, X_T, timesteps(SCHED, 500, t_end=float(grid[-1])), solver="dpm_solver_pp", order=3,
                       denoise_to_zero=True)
    assert rel(always, reference) < rel(default, reference)
    logsnr = timesteps(SCHED, 20)
    reference = solve(TEACHER, X_T, timesteps(SCHED, 500), solver="dpm_solver_pp", order=3)
    err = [rel(solve(TEACHER, X_T, logsnr, solver="unipc", order=3, lower_order_final=lof), reference)
           for lof in (True, "always")]
    assert abs(err[0] - err[1]) < 0.05 * err[1]


def test_unipc_bh1_final_sigma_zero_is_nan_in_diffusers_but_not_here():
    x, grid, _ = diffusers_run(UniPCMultistepScheduler(solver_order=2, solver_type="bh1"), 10)
    assert torch.isnan(x).all()                          # B(h) = h = inf times a zero residual
    ours = solve(TEACHER, X_T, grid, solver="unipc", order=2, variant="bh1", denoise_to_zero=True)
    assert torch.isfinite(ours).all()
    x_bh2, _, _ = diffusers_run(UniPCMultistepScheduler(solver_order=2, solver_type="bh2"), 10)
    assert rel(ours, x_bh2) < 0.05                       # and close to the bh2 solve, as it should be
