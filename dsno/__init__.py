"""dsno: distill diffusion models into one-pass neural operators, with verified fast solvers."""

from dsno import processes, solvers, teachers
from dsno.sampler import load_sampler
from dsno.schedules import FlowSchedule, VESchedule, VPSchedule
from dsno.solvers import sample, timesteps

__all__ = ["FlowSchedule", "VESchedule", "VPSchedule", "load_sampler", "processes", "sample", "solvers", "teachers",
           "timesteps"]
__version__ = "0.1.0"
