"""Training-free fast solvers for diffusion ODEs / SDEs, verified against exact oracles.

    ts = timesteps(schedule, steps=10, spacing="logsnr")           # float64, decreasing
    x0 = solve(teacher, x_T, ts, solver="dpm_solver_pp", order=3)
    nfe("heun", 10) == 20; steps_for_nfe("dpm_solver", 9, order=3) == 3

Solvers (`available()`): ddim, deis (tab / logrho / rhoab / rhork), ipndm, dpm_solver,
dpm_solver_pp, unipc (bh1 / bh2), euler, heun, usf (per-step solver schedules, `dsno.solvers.usf`), and the
stochastic ddpm, sde_dpm_solver_pp. For augmented processes (PSLD; `available("augmented")`,
`dsno.solvers.psld`, `dsno.solvers.psld_splitting`): augmented_euler, augmented_euler_maruyama, lambda_ddim
(variant I / II), sscs, nvv, rvv, noba, roba, csps_d, sps_s, csps_s.
"""

from dsno.solvers import (ddim, deis, dpm_solver, ipndm, pf_ode, psld, psld_splitting, sde,  # noqa: F401  (registers)
                         unipc, usf)
from dsno.renamed import refuse_renamed
from dsno.solvers.api import solve
from dsno.solvers.core import LOWER_ORDER_FINAL_BELOW
from dsno.solvers.grids import SPACINGS, check_grid, from_grid, timesteps
from dsno.solvers.registry import SolverSpec, available, get, nfe, steps_for_nfe

__all__ = ["solve", "timesteps", "from_grid", "check_grid", "available", "nfe", "steps_for_nfe", "get",
           "SolverSpec", "SPACINGS", "LOWER_ORDER_FINAL_BELOW"]
__getattr__ = refuse_renamed("dsno.solvers", {"sample": "solve"})
