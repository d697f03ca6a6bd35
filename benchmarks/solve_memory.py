"""Peak memory of one teacher-stage solve against the solver's step count.

The teacher stage stores M states per trajectory; a solve that keeps only the grid indices it
needs (`return_trajectory=indices`, what `dsno.stages.trajectories.make_solve` does) should hold
about the same memory at 15 or 960 steps, where keeping every state and slicing afterwards
grows with the steps. Each solve runs in its own child process; its peak resident set comes
from `resource.getrusage(RUSAGE_CHILDREN)`.

    python benchmarks/solve_memory.py                  # mnist_gmm teacher, float64, batch 512, M = 4
    python benchmarks/solve_memory.py --steps 15 60 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

TIMES = [0.5625, 0.25, 0.0625, 0.001]


def worker(steps: int, keep: str, batch: int) -> dict:
    import torch

    from dsno.config import SolverConfig
    from dsno.solvers import solve
    from dsno.builders import output_indices, solver_grid
    from dsno.stages.trajectories import make_solve
    from dsno.teachers.mnist_gmm import load_mnist_gmm
    torch.set_num_threads(1)
    teacher = load_mnist_gmm()
    sc = SolverConfig(steps=steps)
    grid = solver_grid(teacher, sc, TIMES)
    x_T = torch.randn(batch, *teacher.shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if keep == "indices":
        states = make_solve(teacher, sc, grid, TIMES)(x_T)
    else:
        with torch.no_grad():
            full = solve(teacher, x_T.double(), grid, solver=sc.name, order=sc.order, return_trajectory=True)
        states = full[output_indices(grid, TIMES)].transpose(0, 1).float()
    return {"seconds": time.perf_counter() - start, "shape": list(states.shape), "grid": len(grid) - 1,
            "checksum": float(states.double().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[15, 60, 240, 960])
    p.add_argument("--batch", type=int, default=512, help="trajectories per solve (data.batch_size)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--keep", default="indices", help=argparse.SUPPRESS)
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "worker":
        print(json.dumps(worker(args.one, args.keep, args.batch)))
        return
    if args.role == "measure":
        cmd = [sys.executable, __file__, "--role", "worker", "--keep", args.keep, "--one", str(args.one),
               "--batch", str(args.batch)]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps(out))
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = ["| solver steps | grid steps | keep indices: peak RSS | keep all, then slice: peak RSS | same states |",
            "|---:|---:|---:|---:|---|"]
    for steps in args.steps:
        got = {}
        for keep in ("indices", "all"):
            cmd = [sys.executable, __file__, "--role", "measure", "--keep", keep, "--one", str(steps),
                   "--batch", str(args.batch)]
            got[keep] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                  env=env).stdout.splitlines()[-1])
        same = got["indices"]["checksum"] == got["all"]["checksum"]
        print(f"steps {steps:5d} (grid {got['indices']['grid']}): indices {got['indices']['peak_rss_mib']:.0f} MiB, "
              f"all {got['all']['peak_rss_mib']:.0f} MiB, same states: {same}", flush=True)
        rows.append(f"| {steps} | {got['indices']['grid']} | {got['indices']['peak_rss_mib']:.0f} MiB | "
                    f"{got['all']['peak_rss_mib']:.0f} MiB | {'yes' if same else 'NO'} |")
    if not args.no_write:
        from results_md import write_section
        body = (f"Command: `python benchmarks/solve_memory.py{''.join(' ' + a for a in sys.argv[1:])}`; machine: "
                f"{platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}. One teacher-stage solve "
                f"of the default mixture teacher (float64, DPM-Solver++ 3M, batch {args.batch} of 1x16x16, "
                f"M = {len(TIMES)} output times), each in its own process; peak resident memory by getrusage. "
                "`make_solve` keeps only the M output states (`return_trajectory=indices`); the old path kept "
                "every state and sliced after.\n\n" + "\n".join(rows))
        write_section("solve_memory", "Teacher-solve memory against the step count (`benchmarks/solve_memory.py`)",
                      body)


if __name__ == "__main__":
    main()
