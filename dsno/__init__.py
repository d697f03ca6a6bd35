"""dsno: distill diffusion models into one-pass neural operators, with verified fast solvers."""

from dsno import teachers
from dsno.schedules import VPSchedule

__all__ = ["VPSchedule", "teachers"]
__version__ = "0.1.0"
