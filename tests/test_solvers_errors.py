"""Bad input to dsno.solvers: every case is one ValueError whose message names the bad value
and what is allowed."""

import math

import pytest
import torch

from dsno.schedules import VPSchedule
from dsno.solvers import from_grid, nfe, solve, steps_for_nfe, timesteps
from dsno.teachers import GaussianMixture

SCHED = VPSchedule.linear()
TEACHER = GaussianMixture(torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64),
                          schedule=SCHED)
X = torch.randn(2, 4, dtype=torch.float64)
GRID = torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=torch.float64)


def run(ts=GRID, **kw):
    return lambda: solve(TEACHER, X, ts, **kw)


CASES = [
    # solver names, orders, options
    ("unknown solver", run(solver="rk45"), "unknown solver 'rk45'; available: ddim, ddpm, deis"),
    ("order too high", run(solver="dpm_solver_pp", order=4), "has orders 1..3, got order=4"),
    ("order zero", run(solver="ipndm", order=0), "has orders 1..4, got order=0"),
    ("order of a fixed-order solver", run(solver="heun", order=1), "'heun' has order 2, got order=1"),
    ("order not an int", run(solver="deis", order=2.0), "got order=2.0"),
    ("unknown option", run(solver="ddim", shipped_3m=True), "'ddim' has no option 'shipped_3m'; its options are: eta"),
    ("bad variant", run(solver="deis", variant="ab"), "variant='ab' is not one of: 'tab', 'logrho', 'rhoab', 'rhork'"),
    ("bad method", run(solver="dpm_solver", method="multistep"),
     "method='multistep' is not one of: 'singlestep', 'fast'"),
    ("bad unipc variant", run(solver="unipc", variant="bh3"), "variant='bh3' is not one of: 'bh1', 'bh2'"),
    ("bad space", run(solver="heun", space="lambda"), "space='lambda' is not one of: 'sigma', 't'"),
    ("option that does not apply", run(solver="dpm_solver_pp", method="singlestep", shipped_3m=True),
     "shipped_3m=True does not apply to method='singlestep'"),
    ("threshold settings without thresholding", run(solver="dpm_solver_pp", ratio=0.9),
     "ratio=0.9 does not apply to thresholding=False"),
    ("bad eta", run(solver="ddim", eta=2.0), "eta=2.0 must be in [0, 1]"),
    ("bad lower_order_final", run(solver="unipc", lower_order_final="sometimes"),
     "lower_order_final='sometimes' must be True, False or 'always'"),
    ("trajectory of the fast mix", run(solver="dpm_solver", method="fast", return_trajectory=True),
     "method='fast' skips the grid points"),
    # grids
    ("grid not decreasing", run(ts=[1.0, 0.2, 0.5, 0.01]),
     "strictly decreasing (from noise to data): ts[2] = 0.5 follows ts[1] = 0.2"),
    ("grid with a duplicate", run(ts=[1.0, 0.5, 0.5, 0.01]), "ts[1] and ts[2] are both 0.5"),
    ("grid with NaN", run(ts=[1.0, math.nan, 0.01]), "ts[1] = nan: a grid must hold finite times"),
    ("grid beyond T", run(ts=[1.5, 0.5, 0.01]), "ts[0] = 1.5 lies outside [t_min, T] = [1e-05, 1]"),
    ("grid below t_min", run(ts=[1.0, 0.5, 0.0]), "ts[2] = 0 lies outside [t_min, T]"),
    ("grid of one point", run(ts=[0.5]), "at least 2 times"),
    ("not a teacher", lambda: solve(lambda x, t: x, X, GRID), "teacher must provide .schedule, .eps(x, t)"),
    ("integer state", lambda: solve(TEACHER, torch.zeros(2, 4, dtype=torch.int64), GRID), "floating-point tensor"),
    ("timesteps: t_end above t_start", lambda: timesteps(SCHED, 10, t_start=0.5, t_end=0.7),
     "t_start = 0.5 must be greater than t_end = 0.7"),
    ("timesteps: t_end below t_min", lambda: timesteps(SCHED, 10, t_end=1e-7), "t_end = 1e-07 lies outside"),
    ("timesteps: discrete t_min", lambda: timesteps(VPSchedule.ddpm_linear(), 10, t_end=1e-4),
     "t_end = 0.0001 lies outside [t_min, T] = [0.001, 1]"),
    ("timesteps: spacing", lambda: timesteps(SCHED, 10, spacing="cosine"), "unknown spacing 'cosine'; use one of"),
    ("timesteps: steps", lambda: timesteps(SCHED, 0), "steps must be an integer >= 1, got 0"),
    ("from_grid: kind", lambda: from_grid(SCHED, [1.0, 0.5], kind="index"), "kind='index' needs a discrete schedule"),
    ("from_grid: sigma zero", lambda: from_grid(SCHED, [80.0, 0.0], kind="sigma"), "EDM sigmas must be > 0"),
    # NFE budgets
    ("heun with odd NFE", lambda: steps_for_nfe("heun", 7),
     "'heun' (order 2) cannot spend exactly 7 model evaluations: it costs 2 per step (+1 with denoise_to_zero); "
     "budgets it can meet up to 12: 2, 4, 6, 8, 10, 12"),
    ("singlestep budget", lambda: steps_for_nfe("dpm_solver", 10, order=3),
     "budgets it can meet up to 17: 3, 6, 9, 12, 15"),
    ("budget below the denoising step", lambda: steps_for_nfe("ddim", 1, denoise_to_zero=True),
     "cannot spend exactly 1 model evaluations"),
    ("budget zero", lambda: steps_for_nfe("ddim", 0), "nfe must be an integer >= 1, got 0"),
    ("nfe of zero steps", lambda: nfe("ddim", 0), "steps must be an integer >= 1, got 0"),
    ("nfe with an unknown solver", lambda: nfe("dpm", 10), "unknown solver 'dpm'"),
    ("nfe with a bad option", lambda: nfe("deis", 10, variant="x"), "variant='x' is not one of"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value), str(info.value)
