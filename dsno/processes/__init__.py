"""Diffusion processes: the one place that knows how a diffusion is parameterised.

Scalar linear processes x_t = alpha_t x0 + sigma_t eps (`VPSchedule`, `VESchedule`,
`FlowSchedule`, from `dsno.schedules`) and the augmented phase-space process `PSLD`
(z = (x, m) per pixel, 2x2 transition and covariance); `ScalarLinear` shows a scalar schedule
in PSLD's linear-SDE form (k = 1 component per pixel). Bad parameters raise `ProcessError`
(a `dsno.errors.UserError`).
"""

from dsno.processes.linear import ScalarLinear
from dsno.processes.psld import PSLD
from dsno.schedules import FlowSchedule, ProcessError, Schedule, VESchedule, VPSchedule, schedule_from_dict

__all__ = ["PSLD", "FlowSchedule", "ProcessError", "ScalarLinear", "Schedule", "VESchedule", "VPSchedule",
           "schedule_from_dict"]
