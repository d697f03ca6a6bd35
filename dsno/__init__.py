"""dsno: distill diffusion models into one-pass neural operators, with verified fast solvers.

    dsno.solve(teacher, x_T, dsno.timesteps(schedule, n), solver="dpm2")   # a teacher's samples
    dsno.solve(teacher, x_T, grid, cond=labels)        # a class-conditional teacher: labels [B] in [0, K)
    sampler = dsno.load_sampler("runs/x/sampler")       # an exported one-pass DSNO sampler
    sampler.sample(n, seed=0)                           # n images [n, c, H, W]
    sampler.sample(n, seed=0, labels=3)                 # a class-conditional one (sampler.num_classes = K):
                                                        #   an int (every image) or n labels in [0, K)
"""

from dsno import processes, solvers, teachers
from dsno.renamed import refuse_renamed
from dsno.sampler import load_sampler
from dsno.schedules import FlowSchedule, VESchedule, VPSchedule
from dsno.solvers import solve, timesteps

__all__ = ["FlowSchedule", "VESchedule", "VPSchedule", "load_sampler", "processes", "solve", "solvers",
           "teachers", "timesteps"]
__version__ = "0.1.0"
__getattr__ = refuse_renamed("dsno", {"sample": "solve"})     # solve runs a solver; a loaded Sampler is a DSNO
