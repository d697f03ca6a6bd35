"""Cost of verifying shards before first use (data.verify=quick) against the training time.

For each scale (1x and 100x the default 4,096 trajectories of 1x16x16, M = 4) it generates a data
set with a cheap elementwise solve, then, each in a fresh process with the shard pages evicted from
the page cache (posix_fadvise DONTNEED) so the first read comes from the disk:
  none   the training loader (StepTrajectoryData) with data.verify=none, for K batches
  first  the same with data.verify=quick and no verified.json: every shard is read and checked
         (sha256, finite values) before its first batch; K = the batches until all are verified
  later  data.verify=quick again, verified.json written by `first` present
Overhead = wall time (construction + K batches) of first / later minus none, medians of --repeats. The training time it
is compared with is trainer.max_steps of the mnist_gmm experiment (the default when this was measured)
times the mean step time of its model (Lightning, CPU), measured over --train-steps steps after --warmup-steps.

    python benchmarks/verify_overhead.py                     # 1x and 100x, writes benchmarks/RESULTS.md
    python benchmarks/verify_overhead.py --scales 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMES = [0.5625, 0.25, 0.0625, 0.001]


def _evict(folder: Path) -> None:
    os.sync()
    for p in folder.glob("shard-*.npy"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def generate_worker(args: argparse.Namespace) -> dict:
    import torch

    from dsno.data import generate_dataset, make_fingerprint
    scale = torch.tensor(TIMES).view(1, -1, 1, 1, 1)
    fp = make_fingerprint(teacher={"class": "benchmark"}, solver={"name": "elementwise"}, grid=[1.0, *TIMES],
                          times=TIMES, state_shape=(1, 16, 16))
    start = time.perf_counter()
    generate_dataset(args.out, solve=lambda x: x[:, None] * scale, fingerprint=fp, num_trajectories=args.count,
                     shard_size=1024, state_shape=(1, 16, 16), seed=0, batch_size=512, progress=False)
    return {"seconds": time.perf_counter() - start}


def load_worker(args: argparse.Namespace) -> dict:
    """Construction + batches of the training loader; with --batches 0, until every shard is verified."""
    from dsno.training.data import StepTrajectoryData
    start = time.perf_counter()
    dm = StepTrajectoryData(args.out, batch_size=args.batch_size, val_fraction=0.05, seed=0, verify=args.verify)
    dm.setup()
    ds = dm.dataset
    k = 0
    for k, (x_T, states) in enumerate(dm.train_dataloader(), 1):
        done = ds.verifier is None or ds.verifier.all_verified
        if (args.batches and k >= args.batches) or (not args.batches and done and k >= 50):
            break
    if ds.verifier is not None:
        ds.verifier.flush()
    return {"seconds": time.perf_counter() - start, "batches": k,
            "hash_seconds": ds.verifier.seconds if ds.verifier is not None else 0.0}


def train_worker(args: argparse.Namespace) -> dict:
    """Mean seconds per training step of the mnist_gmm experiment's model on this machine."""
    import lightning as L
    import torch

    from dsno.builders import build_student, build_teacher, state_shape
    from dsno.config import compose, validate
    from dsno.training.data import StepTrajectoryData
    from dsno.training.losses import TrajectoryLoss, time_weights
    from dsno.training.ema import EMA
    from dsno.training.module import DSNOModule

    rc = validate(compose("experiment=mnist_gmm", f"run_dir={args.out}/run", "logger=csv"))
    teacher = build_teacher(rc.teacher)
    shape = state_shape(teacher)
    model, _ = build_student(rc, teacher, shape)
    weights = time_weights(teacher.schedule, rc.data.times, rc.train.weight_min, rc.train.weight_max)
    module = DSNOModule(model, TrajectoryLoss(weights, rc.train.loss), rc.train.lr, rc.train.warmup_steps)
    data = StepTrajectoryData(args.out, rc.train.batch_size, val_fraction=rc.data.val_fraction, seed=0,
                              verify="none")
    stamps: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, *a):
            stamps.append(time.perf_counter())

    steps = args.warmup_steps + args.train_steps
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=rc.trainer.precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        gradient_clip_val=rc.train.grad_clip or None, use_distributed_sampler=False,
                        callbacks=[EMA(rc.train.ema_decay), Clock()])   # a step includes its EMA update
    trainer.fit(module, datamodule=data)
    timed = stamps[args.warmup_steps - 1:]
    return {"step_seconds": (timed[-1] - timed[0]) / (len(timed) - 1), "max_steps": rc.trainer.max_steps,
            "batch_size": rc.train.batch_size, "threads": torch.get_num_threads()}


def _child(role: str, out: Path, **kw) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--out", str(out)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(out: Path, batch_size: int, repeats: int) -> dict:
    """first / later / none loader runs on `out`, each from evicted pages; the median of `repeats`."""
    runs: dict[str, list[dict]] = {"first": [], "later": [], "none": []}
    for _ in range(repeats):
        (out / "verified.json").unlink(missing_ok=True)
        _evict(out)
        runs["first"].append(_child("load", out, verify="quick", batches=0, batch_size=batch_size))
        k = runs["first"][-1]["batches"]
        _evict(out)
        runs["later"].append(_child("load", out, verify="quick", batches=k, batch_size=batch_size))
        _evict(out)
        runs["none"].append(_child("load", out, verify="none", batches=k, batch_size=batch_size))
    return {name: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for name, rs in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="trajectories at scale 1 (the default data.num_trajectories)")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 100])
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="loader runs per setting (the median is reported)")
    p.add_argument("--dir", default=None, help="where to write the data sets (default: a temp folder, removed after)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/RESULTS.md")
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--verify", default="quick", help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args()
    workers = {"generate": generate_worker, "load": load_worker, "train": train_worker}
    if args.role in workers:
        print(json.dumps(workers[args.role](args)))
        return

    started, load = time.time(), os.getloadavg()
    root = Path(args.dir or tempfile.mkdtemp(prefix="dsno-verify-"))
    rows = []
    try:
        train = None
        for scale in sorted(args.scales):
            out = root / f"x{scale}"
            gen = _child("generate", out, count=args.n * scale)
            if train is None:
                train = _child("train", out, train_steps=args.train_steps, warmup_steps=args.warmup_steps)
                total = train["step_seconds"] * train["max_steps"]
                print(f"training: {train['step_seconds']:.3f} s/step x {train['max_steps']} steps = {total:.0f} s "
                      f"(batch {train['batch_size']}, {train['threads']} threads)", flush=True)
            m = measure(out, train["batch_size"], args.repeats)
            disk = sum(f.stat().st_size for f in out.glob("shard-*")) / 2**20
            first = m["first"]["seconds"] - m["none"]["seconds"]
            later = m["later"]["seconds"] - m["none"]["seconds"]
            rows.append((scale, args.n * scale, disk, gen["seconds"], m, first, later, total))
            print(f"{scale:>4}x {args.n * scale:>9,} trajectories {disk:7.0f} MiB: generation {gen['seconds']:.1f} s; "
                  f"{m['first']['batches']} batches: none {m['none']['seconds']:.2f} s, first {m['first']['seconds']:.2f} s "
                  f"(hashing {m['first']['hash_seconds']:.2f} s), later {m['later']['seconds']:.2f} s; overhead "
                  f"first {first:.2f} s = {100 * first / total:.2f} %, later {later:.2f} s = {100 * later / total:.2f} % "
                  f"of training", flush=True)
            shutil.rmtree(out)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.no_write:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_md import write_section
    table = ["| scale | trajectories | shards on disk | batches | verify=none s | first run (quick) s | of which hashing s "
             "| later run (quick) s | overhead, first run | overhead, later runs |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst = max(max(r[5] for r in rows), 0.0)
    for scale, n, disk, _, m, first, later, total in rows:
        table.append(f"| {scale}x | {n:,} | {disk:.0f} MiB | {m['first']['batches']} | {m['none']['seconds']:.2f} | "
                     f"{m['first']['seconds']:.2f} | {m['first']['hash_seconds']:.2f} | {m['later']['seconds']:.2f} | "
                     f"{first:.2f} s = {100 * first / total:.2f} % | {later:.2f} s = {100 * later / total:.2f} % |")
    body = (f"Command: `python benchmarks/verify_overhead.py{''.join(' ' + a for a in sys.argv[1:])}`; machine: "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}; "
            f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, run time {time.time() - started:.0f} s; "
            f"run under `nice -n 15` next to other jobs (load average {load[0]:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end).\n\n"
            f"Training time of the default run: {train['step_seconds']:.3f} s per step (default model, batch "
            f"{train['batch_size']}, {train['threads']} torch threads, mean of {args.train_steps} Lightning steps after "
            f"{args.warmup_steps}) x trainer.max_steps = {train['max_steps']} = {total:.0f} s; it does not depend on "
            "the data set size. Each loader run is a fresh process reading shard pages evicted from the page cache. "
            "`first`: data.verify=quick with no verified.json, so every shard's sha256 and finite values are checked "
            "before its first batch; K batches = until every shard is verified. `later`: the next run, verified.json "
            "present (only stat calls). Overhead = run minus the verify=none run over the same batches (medians of "
            f"{args.repeats} runs each), as a share of the training time. A negative value: the verifying run reads "
            "each shard once in order, which leaves its pages cached for the random reads of the batches that "
            f"follow. The largest first-run overhead, {worst:.2f} s, stays under 5 % of any training run longer "
            f"than {worst / 0.05:.0f} s.\n\n" + "\n".join(table))
    write_section("verify_overhead", "Shard verification before first use (`benchmarks/verify_overhead.py`)", body)


if __name__ == "__main__":
    main()
