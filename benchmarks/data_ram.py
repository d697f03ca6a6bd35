"""Peak memory of trajectory-data generation and reading at 1x / 10x / 100x the trajectory count.

Each measurement runs in a fresh child process; the parent reports the child's peak resident set
via `resource.getrusage(RUSAGE_CHILDREN)` (measured from a per-measurement intermediate process, so
each number is one run's own peak). The solve is a cheap elementwise stand-in for a solver, so
only the data path is measured. Reading walks the whole data set through a shuffled DataLoader and
also reports the peak of anonymous memory (RssAnon): mapped shard pages are the kernel's page
cache (counted in RSS while mapped, evictable), anonymous memory is the process's own.

    python benchmarks/data_ram.py                       # N = 1000 trajectories of 1x16x16, M = 4
    python benchmarks/data_ram.py --n 1000 --shape 3 32 32 --scales 1 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def generate_worker(args: argparse.Namespace) -> dict:
    import torch

    from dsno.data import generate_dataset, make_fingerprint

    times = [1.0 - k / max(args.times - 1, 1) for k in range(args.times)]
    scale = torch.tensor(times).view(1, -1, *([1] * len(args.shape)))
    fp = make_fingerprint(teacher={"class": "benchmark"}, solver={"name": "elementwise"}, grid=times,
                          times=times, state_shape=tuple(args.shape))
    start = time.perf_counter()
    generate_dataset(args.out, solve=lambda x: x[:, None] * scale, fingerprint=fp,
                     num_trajectories=args.count, shard_size=args.shard_size, state_shape=tuple(args.shape),
                     seed=0, batch_size=args.batch_size, progress=False)
    return {"seconds": time.perf_counter() - start, "rss_anon_end_mib": _rss_anon_kib() / 1024}


def read_worker(args: argparse.Namespace) -> dict:
    import torch

    from dsno.data import TrajectoryDataset

    ds = TrajectoryDataset(args.out, verify="quick")
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True)
    start, peak_anon, total = time.perf_counter(), 0, 0.0
    for step, (x_T, states) in enumerate(loader):
        total += float(states[:, -1].sum())
        if step % 20 == 0:
            peak_anon = max(peak_anon, _rss_anon_kib())
    return {"seconds": time.perf_counter() - start, "rss_anon_peak_mib": max(peak_anon, _rss_anon_kib()) / 1024}


def measure(args: argparse.Namespace) -> dict:
    """Run one worker as a child; report its result and its peak RSS from RUSAGE_CHILDREN."""
    cmd = [sys.executable, __file__, "--role", f"{args.role[len('measure-'):]}-worker", "--out", args.out,
           "--count", str(args.count), "--shape", *map(str, args.shape), "--times", str(args.times),
           "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="trajectories at scale 1 (default: mnist_gmm's count)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/RESULTS.md")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--shape", type=int, nargs="+", default=[1, 16, 16])
    p.add_argument("--times", type=int, default=4, help="M, states stored per trajectory")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dir", default=None, help="where to write (default: a temp folder, removed after)")
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.role in ("generate-worker", "read-worker"):
        print(json.dumps((generate_worker if args.role == "generate-worker" else read_worker)(args)))
        return
    if args.role.startswith("measure-"):
        print(json.dumps(measure(args)))
        return

    root = Path(args.dir or tempfile.mkdtemp(prefix="dsno-data-ram-"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"shape {args.shape}, M = {args.times}, shard_size {args.shard_size}, batch {args.batch_size}; "
          f"data in {root}")
    print(f"{'scale':>6} {'trajectories':>12} {'on disk':>10} {'gen s':>7} {'gen peak RSS':>13} "
          f"{'read s':>7} {'read peak RSS':>14} {'read peak anon':>15}")
    table = ["| scale | trajectories | on disk | generation s | generation peak RSS | reading s | reading peak RSS "
             "| reading peak anonymous |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    try:
        for scale in args.scales:
            out = root / f"x{scale}"
            results = {}
            for role in ("generate", "read"):
                cmd = [sys.executable, __file__, "--role", f"measure-{role}", "--out", str(out),
                       "--count", str(args.n * scale), "--shape", *map(str, args.shape), "--times",
                       str(args.times), "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                results[role] = json.loads(done.stdout.strip().splitlines()[-1])
            disk = sum(f.stat().st_size for f in out.iterdir()) / 2**20
            g, r = results["generate"], results["read"]
            print(f"{scale:>6} {args.n * scale:>12,} {disk:>7.0f} MiB {g['seconds']:>7.1f} "
                  f"{g['peak_rss_mib']:>9.0f} MiB {r['seconds']:>7.1f} {r['peak_rss_mib']:>10.0f} MiB "
                  f"{r['rss_anon_peak_mib']:>11.0f} MiB", flush=True)
            table.append(f"| {scale}x | {args.n * scale:,} | {disk:.0f} MiB | {g['seconds']:.1f} | "
                         f"{g['peak_rss_mib']:.0f} MiB | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} MiB | "
                         f"{r['rss_anon_peak_mib']:.0f} MiB |")
            shutil.rmtree(out)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if not args.no_write:
        import platform

        from results_md import write_section
        body = (f"Command: `python benchmarks/data_ram.py{''.join(' ' + a for a in sys.argv[1:])}`; machine: "
                f"{platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}. Peak resident memory of "
                f"each stage in its own process, by the operating system (getrusage): shape {args.shape}, "
                f"M = {args.times}, shard_size {args.shard_size}. Reading RSS counts mapped shard pages (page cache, "
                "evictable); anonymous memory is the process's own.\n\n" + "\n".join(table))
        write_section("data_ram", "Teacher-stage memory (`benchmarks/data_ram.py`)", body)


if __name__ == "__main__":
    main()
