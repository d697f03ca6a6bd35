"""Benchmark of searched USF solver schedules on the neural UNet teacher (experiment mnist_unet_cpu): on
noise never used by the search, the searched solver schedule's final-sample RMSE next to every
hand-designed ODE solver of the library (each on every library spacing) and the timestep-only
search of the same budget, against the teacher's long solve (state float64, network float32);
then, from eval's metrics.json of the trained run, the usf rows' RMSE and FID beside the solvers'.

    python benchmarks/usf_unet.py                  # searches what is missing, checks, writes RESULTS.md
    python benchmarks/usf_unet.py --nfe 5 --no-write

Searches: SEARCH_COMMON + SEARCH_FULL (or SEARCH_TS) below, their solver schedules read from
RUN/solver_schedules/. Per-solver RMSEs are kept in RUN/heldout.json (resumable; keyed by the teacher's
fingerprint, the noise and the reference). Checks, per NFE: USF RMSE <= 0.7 x the best hand-designed
solver's, and < the timestep-only search's. Exit status 1 when one fails.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import usf as gmm_bench
from results_md import write_section
from dsno.solvers import solve, steps_for_nfe, timesteps
from dsno.run_files import SOLVER_SCHEDULES_DIR
from dsno.solvers import usf
from dsno.solvers.grids import SPACINGS

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "mnist_unet_cpu"
HELD_OUT_SEED = 777_777          # the search draws seeds 1 and 2, eval 1234
SEARCH_COMMON = [f"experiment={EXPERIMENT}", "logger=csv"]
SEARCH_FULL: list[str] = []      # the experiment's own search section (conf/experiment/mnist_unet_cpu.yaml)
SEARCH_MORE = {10: ["search.rounds=12", "search.verify_top=16"]}   # resumes the default search: see the notes
SEARCH_TS = ["search.mode=timesteps", "search.initial=60", "search.rounds=4", "search.scored_per_round=20",
             "search.proposals=300"]


def search_config(mode: str):
    """The SearchConfig a search of `mode` runs with (the experiment's section plus SEARCH_TS)."""
    from dsno.config import compose
    from dsno.search.cli import split
    return split(compose("schema=search", *SEARCH_COMMON, *(SEARCH_TS if mode == "timesteps" else SEARCH_FULL)))[2]


EVAL_RUN = "runs/mnist_unet_quick"
EVAL_COMMAND = "python eval.py logger=csv eval.spacing=time_quadratic 'eval.nfe=[5,10]'"


def search_command(nfe: int, mode: str, run_dir: str) -> list[str]:
    return [sys.executable, "-m", "dsno.search", *SEARCH_COMMON, f"run_dir={run_dir}", f"nfe={nfe}",
            *(SEARCH_TS if mode == "timesteps" else SEARCH_FULL + SEARCH_MORE.get(nfe, []))]


def ensure_solver_schedule(nfe: int, mode: str, run_dir: str) -> Path:
    path = ROOT / run_dir / SOLVER_SCHEDULES_DIR / (f"nfe{nfe}" + ("_timesteps" if mode == "timesteps" else "") + ".yaml")
    if not path.is_file():
        cmd = search_command(nfe, mode, run_dir)
        print("running:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return path


def load_teacher():
    from dsno.builders import build_teacher, state_shape
    from dsno.config import compose, validate
    rc = validate(compose(f"experiment={EXPERIMENT}", "logger=csv"))
    teacher = build_teacher(rc.teacher)
    return teacher, tuple(state_shape(teacher)), float(rc.solver.t_end)


class HeldOut:
    """The held-out noise, its reference and the RMSE of every solve, cached under RUN/."""

    def __init__(self, teacher, shape, t_end: float, samples: int, ref_steps: int, run_dir: Path):
        self.teacher, self.t_end = teacher, t_end
        key = {"teacher": teacher.fingerprint(), "samples": samples, "seed": HELD_OUT_SEED,
               "reference_steps": ref_steps, "t_end": t_end}
        self.tag = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.path = run_dir / "heldout.json"
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.rows = state.get("rows", {}) if state.get("tag") == self.tag else {}
        self.x = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
        cache = run_dir / ".heldout" / f"{self.tag}-reference.safetensors"
        t0 = time.perf_counter()
        from dsno.search.loop import reference
        self.ref = reference(teacher, self.x, t_end, ref_steps, cache)
        if "reference_s" not in self.rows:
            self.rows["reference_s"] = time.perf_counter() - t0
            self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"tag": self.tag, "rows": self.rows}, indent=0))
        os.replace(tmp, self.path)

    def score(self, name: str, fn) -> float:
        """RMSE of fn(x in float32) against the reference, computed once per name."""
        if name not in self.rows:
            with torch.no_grad():
                out = torch.cat([fn(xb) for xb in self.x.split(256)])
            self.rows[name] = gmm_bench.rmse(out.double(), self.ref)
            self.save()
        return self.rows[name]


def hand_designed(h: HeldOut, nfe: int) -> list[tuple[float, str]]:
    sched, out = h.teacher.schedule, []
    for label, name, order, opts in gmm_bench.HAND:
        for spacing in SPACINGS:
            try:
                steps = steps_for_nfe(name, nfe, order=order, **opts)
            except ValueError:
                continue
            g = timesteps(sched, steps=steps, spacing=spacing, t_end=h.t_end)
            out.append((h.score(f"{label} ({spacing}) nfe{nfe}",
                                lambda x: solve(h.teacher, x, g, solver=name, order=order, **opts)),
                        f"{label} ({spacing})"))
    return sorted(out)


def eval_rows(metrics: Path, nfes: list[int]) -> list[str]:
    """The FID table: per NFE, the usf rows of eval and its best hand-designed solvers by RMSE and by FID."""
    d = json.loads(metrics.read_text())
    rows = [r for r in d["rows"] if "skipped" not in r]
    lines = [f"From `{metrics.relative_to(ROOT)}` ({d['num_samples']} samples of eval's own noise, seed 1234; "
             f"eval's reference: {d['reference']['solver']}, {d['reference']['steps']} logSNR steps; hand-designed: "
             f"eval.solvers on eval.spacing=time_quadratic; FID against the real digits with the digit-classifier features):",
             "", "| NFE | usf nfeN: RMSE | FID | best solver by RMSE | RMSE | FID | best solver by FID | RMSE | FID | "
             "usf FID <= best solver's |", "|---:|---:|---:|---|---:|---:|---|---:|---:|---|"]
    for n in nfes:
        at = [r for r in rows if r["nfe"] == n]
        usf_row = next((r for r in at if r["method"] == f"usf nfe{n}"), None)
        hand = [r for r in at if not r["method"].startswith(("usf", "dsno", "teacher"))]
        if usf_row is None or not hand:
            lines.append(f"| {n} | not in this eval | | | | | | | | |")
            continue
        by_rmse = min(hand, key=lambda r: r["rmse_vs_reference"])
        by_fid = min(hand, key=lambda r: r.get("fid", float("inf")))

        def cell(r):
            fid = f"{r['fid']:.1f}" if "fid" in r else "-"
            return f"{r['rmse_vs_reference']:.4f} | {fid}"
        better = "yes" if usf_row.get("fid", float("inf")) <= by_fid.get("fid", float("inf")) else "NO"
        lines.append(f"| {n} | {cell(usf_row)} | {by_rmse['method']} | {cell(by_rmse)} | {by_fid['method']} | "
                     f"{cell(by_fid)} | {better} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--reference-steps", type=int, default=200)
    ap.add_argument("--run-dir", default="runs/usf_unet")
    ap.add_argument("--eval-metrics", default=f"{EVAL_RUN}/eval/metrics.json")
    ap.add_argument("--hand-only", action="store_true", help="score the hand-designed solvers only (no searches)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    run_dir = ROOT / args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher, shape, t_end = load_teacher()
    h = HeldOut(teacher, shape, t_end, args.samples, args.reference_steps, run_dir)
    rows = []
    for n in args.nfe:
        hand = hand_designed(h, n)
        if args.hand_only:
            print(f"NFE {n}: best hand-designed {hand[0][1]} {hand[0][0]:.4f}")
            continue
        found = {}
        for mode in ("full", "timesteps"):
            path = ensure_solver_schedule(n, mode, args.run_dir)
            s = usf.load(path)
            found[mode] = (h.score(f"usf {path.stem} {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}",
                                   lambda x: solve(teacher, x, solver="usf", solver_schedule=s)), s, path)
        rows.append((n, hand, found))
    if args.hand_only:
        return 0
    lines, ok = gmm_bench.search_table([(n, hand[0][0], hand[0][1], found) for n, hand, found in rows],
                                       timesteps_scored=True)
    detail = ["", "Next best hand-designed solvers on the held-out noise:", ""]
    for n, hand, _ in rows:
        detail.append(f"- NFE {n}: " + "; ".join(f"{name} {r:.4f}" for r, name in hand[1:6]))
    detail += ["", "The searched solver schedules (afs; per step: prediction, Taylor order, estimation order, corrector):", ""]
    for n, _, found in rows:
        s = found["full"][1]
        steps = ", ".join(f"{st.prediction[0]}{st.order}/{st.est_order}{'+c' if st.corrector == 'pseudo' else ''}"
                          for st in s.steps)
        detail.append(f"- NFE {n}: `{found['full'][2].relative_to(ROOT)}`: afs={s.afs}, {len(s.steps)} steps "
                      f"(t = {', '.join(f'{t:.4g}' for t in s.ts)}): {steps}; search verify RMSE "
                      f"{s.info.get('score', {}).get('rmse_verify', float('nan')):.4f}")
    sc, ts_sc = search_config("full"), search_config("timesteps")
    metrics = ROOT / args.eval_metrics
    fid = eval_rows(metrics, args.nfe) if metrics.is_file() else [f"(no {args.eval_metrics}: eval not run)"]
    commands = ["`python " + " ".join(search_command(n, mode, args.run_dir)[1:]) + "`"
                for n in args.nfe for mode in ("full", "timesteps")]
    table = "\n".join(lines)
    print(table)
    print("\n".join(detail))
    print("\n".join(fid))
    wall = time.perf_counter() - t0
    body = "\n".join([
        "Searches (NFE 5 and 10 side by side, one torch thread each): " + "; ".join(commands) + "; then `python "
        "benchmarks/usf_unet.py` (it runs the searches that are missing). FID: the two full-search solver schedules "
        f"copied into `{EVAL_RUN}/{SOLVER_SCHEDULES_DIR}/` of the default run (`python train.py`, experiment "
        f"mnist_unet_quick: the same teacher and t_end), then `{EVAL_COMMAND}` (eval's own noise, reference and "
        "solvers, here on the time-quadratic grid, the best library spacing for this teacher in the held-out table; "
        "eval lists each solver schedule as its `usf <stem>` row).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, no other jobs but "
        f"this work; torch {torch.__version__}. Date: "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; this script {wall:.0f} s (its "
        f"held-out reference {h.rows['reference_s']:.0f} s when made).",
        "",
        f"Teacher: the shipped 16x16 UNet (eps prediction, linear VP schedule), experiment {EXPERIMENT}, t_end = "
        f"{t_end:g}. Final-state RMSE over {args.samples} held-out noise samples x 256 pixels (seed "
        f"{HELD_OUT_SEED}, never used by a search) against the reference: DPM-Solver++ 3M, {args.reference_steps} "
        "logSNR steps, state float64, network float32 (as eval's reference). Every method runs in float32, as the "
        f"searches score them. Hand-designed: every deterministic solver of the library ({len(gmm_bench.HAND)} "
        f"variants) on each of the {len(SPACINGS)} spacings ({', '.join(SPACINGS)}), at exactly N model "
        "evaluations, the best kept. Timestep-only: the same search restricted to the interior times of UniPC "
        f"bh2-3 (GITS / LD3-style; {ts_sc.initial} random grids and {ts_sc.rounds} rounds of {ts_sc.scored_per_round}, "
        f"against the full search's {sc.initial} and {sc.rounds} of {sc.scored_per_round}). Each search scores "
        f"candidates on {sc.batch} noise samples against a {sc.reference_steps}-step reference, refines the best one's "
        f"times ({sc.refine} sweeps of coordinate descent, `search.refine`) and verifies its "
        f"{sc.verify_top} best on {sc.verify_batch} others (the experiment's search section, "
        "conf/experiment/mnist_unet_cpu.yaml; the reference is made by the first search of the run directory, inside "
        "that search's cost, and read from its cache by the others). Search cost: wall time (CPU time) and "
        "teacher calls (sample evaluations) of the whole search.",
        "",
        table,
        *detail,
        "",
        *fid,
    ])
    if not args.no_write:
        write_section("usf_unet", "USF solver schedules on the UNet teacher (`benchmarks/usf_unet.py`)", body)
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
