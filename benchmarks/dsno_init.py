"""Where a DSNO student starts: per-time RMSE at step 0 of each way to read a copied teacher.

    python benchmarks/dsno_init.py --data runs/study_unet/trajectories [--n 256]

For the shipped UNet teacher (eps prediction) and the teacher's own trajectories in --data (made by
`python -m data_gen experiment=mnist_unet solver.steps=20 ...`), the RMSE of each reading of an
untrained student against the stored states x_{t_m} (targets of training), branch by branch:
zero output of each parameterisation, the old reading (Gaussian skip + the teacher's eps head added
as a state), the teacher's own DDIM step from T, and `model.parameterization=denoised` (the
teacher's x0 at a Gaussian-transported point, DDIM-mapped from x_T) for several denoise_time tau_0.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from dsno.nn import DSNO
    from dsno.nn.parameterization import coefficients
    from dsno.teachers.unet import load_unet_teacher

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    times = json.loads((args.data / "manifest.json").read_text())["fingerprint"]["times"]
    x_T = torch.from_numpy(np.load(args.data / "shard-00000.x_T.npy")[:args.n]).float()
    states = torch.from_numpy(np.load(args.data / "shard-00000.states.npy")[:args.n]).float()
    teacher = load_unet_teacher()
    sched = teacher.schedule
    m = len(times)

    def rmse(pred: torch.Tensor) -> list[float]:
        return [float((pred[:, i] - states[:, i]).square().mean().sqrt()) for i in range(m)]

    def student(coef: dict) -> torch.Tensor:
        model = DSNO(copy.deepcopy(teacher.network), times, 2, coef["skip"], out_scale=coef.get("out_scale"),
                     in_scale=coef.get("in_scale"), net_times=coef.get("net_times"))
        with torch.no_grad():
            return model(x_T)

    def per_time(c: list[float]) -> torch.Tensor:
        return torch.tensor(c).reshape(1, m, 1, 1, 1) * x_T.unsqueeze(1)

    gauss = coefficients(sched, times, "state", sigma_data=0.5)
    rows = [("zero output, any reading: the target's RMS", rmse(torch.zeros_like(states))),
            ("state, zero output (Gaussian-optimal skip S(t_m)/S(T) x_T)", rmse(per_time(gauss["skip"]))),
            ("state + copied eps head (the old reading)", rmse(student(gauss)))]
    with torch.no_grad():
        d_T = teacher.x0(x_T, sched.T).float()
    k = torch.tensor([float(sched.sigma(torch.tensor(t, dtype=torch.float64)) / sched.sigma(torch.tensor(sched.T, dtype=torch.float64))) for t in times])
    a_T = float(sched.alpha(torch.tensor(sched.T, dtype=torch.float64)))
    ell = torch.tensor([float(sched.alpha(torch.tensor(t, dtype=torch.float64))) for t in times]) - a_T * k
    ddim = k.reshape(1, m, 1, 1, 1) * x_T.unsqueeze(1) + ell.reshape(1, m, 1, 1, 1) * d_T.unsqueeze(1)
    rows.append(("teacher's DDIM step from T (x0 read at (x_T, T))", rmse(ddim)))
    for tau0 in (0.9, 0.7, 0.5, 0.4):
        coef = coefficients(sched, times, "denoised", "eps", 0.5, tau0)
        if tau0 == 0.5:
            rows.append(("denoised, zero output (tau_0 = 0.5)", rmse(per_time(coef["skip"]))))
        rows.append((f"denoised, copied teacher, tau_0 = {tau0}", rmse(student(coef))))
    print(f"Command: python benchmarks/dsno_init.py {' '.join(sys.argv[1:])}")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
          f"{torch.__version__}, {args.threads} threads; {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{time.time() - started:.0f} s. Targets: the first {args.n} stored trajectories of {args.data}.\n")
    print("| step-0 reading | " + " | ".join(f"RMSE t={t:g}" for t in times) + " |")
    print("|---|" + "---:|" * m)
    for name, vals in rows:
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
