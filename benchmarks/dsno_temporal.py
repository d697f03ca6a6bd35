"""Temporal layer cost: neuralop's SpectralConv (impl="fft") vs the same map as a real matrix ("matmul").

    python benchmarks/dsno_temporal.py [--threads 2]

Forward + backward of one TemporalConv at the shapes of a DSNO training step (batch 32 x M = 4
branches, channels 32 / 64 at 16x16 / 8x8, modes 2) and of a whole DSNO step, best of --repeats.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def layer_case(channels: int, size: int, batch: int, m: int, impl: str, repeats: int) -> float:
    from dsno.nn.temporal import TemporalConv
    layer = TemporalConv(channels, m, 2)
    layer.impl = impl
    with torch.no_grad():
        layer.spectral.weight.tensor.normal_(0, 0.1)
    h = torch.randn(batch * m, channels, size, size, requires_grad=True)

    def run():
        layer.zero_grad()
        layer(h).square().mean().backward()
    return best_time(run, repeats)


def model_case(impl: str, repeats: int, base_channels: int) -> float:
    from dsno.nn import build_dsno, set_temporal_impl
    config = {"format_version": 2, "backbone": {"type": "unet", "kwargs": {
        "in_channels": 1, "out_channels": 1, "image_size": 16, "base_channels": base_channels}},
        "times": [0.5625, 0.25, 0.0625, 0.001], "modes": 2, "state_shape": [1, 16, 16]}
    model = build_dsno(config)
    set_temporal_impl(model, impl)
    x, y = torch.randn(32, 1, 16, 16), torch.randn(32, 4, 1, 16, 16)

    def run():
        model.zero_grad()
        (model(x) - y).square().mean().backward()
    return best_time(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = ["| case | fft (ms) | matmul (ms) | fft / matmul |", "|---|---:|---:|---:|"]
    for channels, size in ((32, 16), (64, 8)):
        f, m = (layer_case(channels, size, 32, 4, impl, args.repeats) * 1e3 for impl in ("fft", "matmul"))
        rows.append(f"| one layer, C={channels}, {size}x{size}, batch 32 x M=4 | {f:.2f} | {m:.2f} | {f / m:.2f} |")
    for base in (24, 32):
        f, m = (model_case(impl, max(3, args.repeats // 3), base) * 1e3 for impl in ("fft", "matmul"))
        rows.append(f"| whole DSNO step, base_channels={base}, batch 32 x M=4 | {f:.1f} | {m:.1f} | {f / m:.2f} |")
    print(f"Command: python benchmarks/dsno_temporal.py {' '.join(sys.argv[1:])}")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
          f"{torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}. Forward + backward, best of {args.repeats}.\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
