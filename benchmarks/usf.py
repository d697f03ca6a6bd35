"""Benchmark of searched USF schedules on the default mixture teacher: on noise never used by the
search, the searched solver schedule's final-sample RMSE next to every hand-designed ODE solver of the
library (each on every library spacing) and the timestep-only search of the same budget.

    python benchmarks/usf.py                     # searches what is missing, checks, writes RESULTS.md
    python benchmarks/usf.py --nfe 5 --no-write

Searches: `python -m dsno.search experiment=mnist_gmm nfe=N [search.mode=timesteps] run_dir=RUN`
(default config), their solver schedules read from RUN/solver_schedules/. Checks, per NFE: USF RMSE <= 0.7 x
the best hand-designed solver's, and < the timestep-only search's. Exit status 1 when one fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from results_md import write_section
from dsno.run_files import SOLVER_SCHEDULES_DIR
from dsno.solvers import solve, steps_for_nfe, timesteps, usf
from dsno.solvers.grids import SPACINGS
from dsno.teachers.mnist_gmm import load_mnist_gmm

ROOT = Path(__file__).resolve().parent.parent
T_END = 1e-3
HELD_OUT_SEED = 777_777          # the search draws seeds 1 and 2, eval 1234
HAND = [
    ("ddim", "ddim", 1, {}), ("euler", "euler", 1, {}), ("heun", "heun", 2, {}),
    ("deis tAB-3", "deis", 3, {"variant": "tab"}), ("deis log-rho-3", "deis", 3, {"variant": "logrho"}),
    ("deis rhoAB-3", "deis", 3, {"variant": "rhoab"}), ("deis rhoRK-3", "deis", 3, {"variant": "rhork"}),
    ("ipndm-4", "ipndm", 4, {}), ("ipndm-3", "ipndm", 3, {}),
    ("dpm_solver-3", "dpm_solver", 3, {}), ("dpm_solver-3 fast", "dpm_solver", 3, {"method": "fast"}),
    ("dpm_solver_pp 2S", "dpm_solver_pp", 2, {"method": "singlestep"}),
    ("dpm_solver_pp-3 fast", "dpm_solver_pp", 3, {"method": "fast"}),
    ("dpm_solver_pp 2M", "dpm_solver_pp", 2, {}), ("dpm_solver_pp 3M", "dpm_solver_pp", 3, {}),
    ("dpm_solver_pp 3M shipped", "dpm_solver_pp", 3, {"shipped_3m": True}),
    ("unipc bh1-3", "unipc", 3, {"variant": "bh1"}), ("unipc bh2-3", "unipc", 3, {"variant": "bh2"}),
    ("unipc bh2-2", "unipc", 2, {"variant": "bh2"}),
]


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    v = float((x - ref).square().mean().sqrt())
    return v if v == v else float("inf")


def _cpu(cost: dict) -> str:
    return f"{cost['cpu_s']:.0f}" if "cpu_s" in cost else "not recorded"


def search_table(rows: list[tuple], timesteps_scored: bool = False) -> tuple[list[str], bool]:
    """Markdown lines of the search table and whether every row passes (<= 0.7x the best hand-designed
    solver and below the timestep-only search). rows: (nfe, best hand RMSE, its name, found) with
    found["full"] / found["timesteps"] = (held-out RMSE, solver schedule, path)."""
    lines = ["| NFE | best hand-designed (spacing) | RMSE | timestep-only search (unipc bh2-3 grid) | USF search | "
             "USF / best hand | <= 0.7x | < timestep-only | USF search: wall s (CPU s), teacher calls (sample evals), "
             "scored, rounds, predictor tau | timestep-only search: wall s (CPU s), teacher calls"
             + (", scored |" if timesteps_scored else " |"),
             "|---:|---|---:|---:|---:|---:|---|---|---|---|"]
    ok = True
    for n, h, hname, found in rows:
        (u, s, _), (ts_only, s_ts, _) = found["full"], found["timesteps"]
        c, ct = s.info.get("cost", {}), s_ts.info.get("cost", {})
        ratio = u / h
        good_ratio, good_ts = ratio <= 0.7, u < ts_only
        ok = ok and good_ratio and good_ts
        lines.append(f"| {n} | {hname} | {h:.4f} | {ts_only:.4f} | {u:.4f} | {ratio:.2f} | "
                     f"{'yes' if good_ratio else 'NO'} | {'yes' if good_ts else 'NO'} | "
                     f"{c.get('wall_s', 0):.0f} ({_cpu(c)}), {c.get('teacher_calls')} "
                     f"({c.get('teacher_sample_evals')}), {c.get('candidates_scored')}, "
                     f"{s.info.get('search', {}).get('rounds')}, {c.get('predictor_kendall_tau')} | "
                     f"{ct.get('wall_s', 0):.0f} ({_cpu(ct)}), {ct.get('teacher_calls')}"
                     + (f", {ct.get('candidates_scored')} |" if timesteps_scored else " |"))
    return lines, ok


def search_command(nfe: int, mode: str, run_dir: str) -> list[str]:
    cmd = [sys.executable, "-m", "dsno.search", "experiment=mnist_gmm", f"nfe={nfe}", f"run_dir={run_dir}",
           "logger=csv"]
    return cmd + (["search.mode=timesteps"] if mode == "timesteps" else [])


def ensure_solver_schedule(nfe: int, mode: str, run_dir: str) -> Path:
    path = ROOT / run_dir / SOLVER_SCHEDULES_DIR / (f"nfe{nfe}" + ("_timesteps" if mode == "timesteps" else "") + ".yaml")
    if not path.is_file():
        cmd = search_command(nfe, mode, run_dir)
        print("running:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--reference-steps", type=int, default=1000)
    ap.add_argument("--run-dir", default="runs/usf_bench")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    teacher = load_mnist_gmm()
    sched = teacher.schedule
    x = torch.randn(args.samples, *teacher.shape, generator=torch.Generator().manual_seed(HELD_OUT_SEED),
                    dtype=torch.float64)
    with torch.no_grad():
        ref = solve(teacher, x, timesteps(sched, steps=args.reference_steps, spacing="logsnr", t_end=T_END),
                     solver="dpm_solver_pp", order=3)
        rows = []
        for n in args.nfe:
            hand = []
            for label, name, order, opts in HAND:
                for spacing in SPACINGS:
                    try:
                        steps = steps_for_nfe(name, n, order=order, **opts)
                    except ValueError:
                        continue
                    g = timesteps(sched, steps=steps, spacing=spacing, t_end=T_END)
                    hand.append((rmse(solve(teacher, x, g, solver=name, order=order, **opts), ref),
                                 f"{label} ({spacing})"))
            best_hand = min(hand)
            found = {}
            for mode in ("full", "timesteps"):
                path = ensure_solver_schedule(n, mode, args.run_dir)
                s = usf.load(path)
                found[mode] = (rmse(solve(teacher, x, solver="usf", solver_schedule=s), ref), s, path)
            rows.append((n, best_hand, found))
    lines, ok = search_table([(n, h, hname, found) for n, (h, hname), found in rows])
    detail = ["", "The searched solver schedules (afs; per step: prediction, Taylor order, estimation order, corrector):", ""]
    for n, _, found in rows:
        s = found["full"][1]
        steps = ", ".join(f"{st.prediction[0]}{st.order}/{st.est_order}{'+c' if st.corrector == 'pseudo' else ''}"
                          for st in s.steps)
        detail.append(f"- NFE {n}: `{found['full'][2].relative_to(ROOT)}`: afs={s.afs}, {len(s.steps)} steps: {steps}")
    commands = []
    for n, _, found in rows:
        for mode in ("full", "timesteps"):
            info = found[mode][1].info
            r = info.get("search", {}).get("rounds")
            batch, verify = info.get("score", {}).get("batch"), info.get("score", {}).get("verify_batch")
            cmd = search_command(n, mode, args.run_dir)[1:] + ([f"search.rounds={r}"] if r not in (None, 12) else []) \
                + ([f"search.batch={batch} search.verify_batch={verify}"] if (batch, verify) != (256, 512) else [])
            commands.append("`python " + " ".join(cmd) + "`")
    table = "\n".join(lines)
    print(table)
    print("\n".join(detail))
    wall = time.perf_counter() - t0
    body = "\n".join([
        "Commands (default search config, the schema's dsno.config.SearchConfig, which mnist_gmm keeps: 12 rounds; a larger search.rounds resumes "
        "the 12-round search from its scored-candidates file): " + "; ".join(commands) + "; then `python "
        "benchmarks/usf.py` (it runs the searches that are missing).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, no other jobs but "
        f"this work (the full and the timestep-only searches ran as two chains side by side, one torch thread "
        f"each); torch {torch.__version__}. Date: "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; this script {wall:.0f} s.",
        "",
        f"Final-state RMSE at t_end = 1e-3 (over {args.samples} held-out noise samples x 256 pixels, seed "
        f"{HELD_OUT_SEED}, never used by a search) against the float64 reference (DPM-Solver++ 3M, "
        f"{args.reference_steps} logSNR steps). Hand-designed: every deterministic solver of the library "
        f"({len(HAND)} variants) on each of the {len(SPACINGS)} spacings ({', '.join(SPACINGS)}), at exactly N "
        "model evaluations, the best kept. Timestep-only: the same search restricted to the interior times of "
        "UniPC bh2-3 (GITS / LD3-style). The search scores candidates on 256 noise samples and verifies its "
        "10 best on 512 others, after 3 sweeps of coordinate descent on the best candidate's times "
        "(search.refine). Search cost: wall time and teacher calls (sample evaluations) of the whole "
        "search; the float64 reference of the search batches (500 steps) is made by the first search of a run "
        "directory (NFE 5, full) and reused from its cache by the others.",
        "",
        table,
        *detail,
    ])
    if not args.no_write:
        write_section("usf", "USF solver schedules and their search (`benchmarks/usf.py`)", body)
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
