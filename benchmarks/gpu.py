"""GPU benchmark of every stage on the DDPM CIFAR-10 UNet2DModel architecture (35.7M parameters,
random weights: they time the same). One call checks, times and prints a table, and writes it to
benchmarks/RESULTS.md (section gpu):

    python benchmarks/gpu.py                 # on a CUDA machine
    python benchmarks/gpu.py --smoke         # CPU, tiny sizes: checks the script runs; writes nothing

Measured, each against its peer in the same run:
  1. data_gen images/s at 10 NFE: dsno's fast path (DPM-Solver++ 2M, bf16 autocast, channels_last,
     torch.compile default mode) against diffusers' loop (DPMSolverMultistepScheduler, eager fp32),
     and the agreement of the fast path with our own fp32 path;
  2. the one-pass DSNO sampler (M=4) on that backbone: images/s, batch-1 latency eager and as a CUDA
     graph, against the teacher's 10-NFE solve at batch 1;
  3. training: images/s and peak memory at batch 256 (bf16 autocast, Adam);
  4. the trajectory loader's images/s from disk-backed shards, against what training consumes.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DDPM_CIFAR10 = dict(  # google/ddpm-cifar10-32's unet/config.json
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_eps=1e-6, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    mid_block_scale_factor=1, time_embedding_type="positional")
SMOKE = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             norm_num_groups=8)
TIMES = [0.5625, 0.25, 0.0625, 0.001]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, warmup: int, iters: int) -> float:
    """Median wall-clock seconds of fn() after `warmup` calls (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def diffusers_loop(unet, x, nfe: int):
    """The peer: diffusers' DPMSolverMultistepScheduler (2M, its defaults), eager fp32."""
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_order=2)
    sched.set_timesteps(nfe, device=x.device)
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU; checks the script, writes nothing")
    ap.add_argument("--gen-batch", type=int, default=1024)
    ap.add_argument("--peer-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=256)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU; use --smoke to check it on the CPU")
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if a.smoke:
        a.gen_batch, a.peer_batch, a.train_batch = 8, 8, 4
    warm, iters = (1, 2) if a.smoke else (3, 10)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    from diffusers import UNet2DModel

    import dsno
    from dsno.nn import build_dsno, diffusers_backbone_spec
    from dsno.teachers.diffusers import DiffusersTeacher

    torch.manual_seed(0)
    unet = UNet2DModel(**(SMOKE if a.smoke else DDPM_CIFAR10)).to(dev).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    shape = (3, unet.config.sample_size, unet.config.sample_size)
    schedule = dsno.VPSchedule.ddpm_linear()
    teacher = DiffusersTeacher(unet, schedule, "eps")
    ts = dsno.timesteps(schedule, steps=10, spacing="logsnr", t_end=1e-3)
    rows: list[tuple[str, str, str]] = []
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    # 1. data_gen throughput at 10 NFE
    with torch.no_grad():
        xp = torch.randn(a.peer_batch, *shape, device=dev)
        t_peer = median_time(lambda: diffusers_loop(unet, xp, 10), warm, iters)
        peer_ips = a.peer_batch / t_peer
        x = torch.randn(a.gen_batch, *shape, device=dev)
        ref32 = dsno.solve(teacher, x[:64], ts, solver="dpm_solver_pp", order=2)
        unet.to(memory_format=torch.channels_last)
        fast_forward = torch.compile(unet.forward) if not a.smoke else unet.forward
        unet.forward = fast_forward

        def ours():
            with torch.autocast(**autocast):
                return dsno.solve(teacher, x, ts, solver="dpm_solver_pp", order=2)

        t_ours = median_time(ours, warm + (2 if not a.smoke else 0), iters)
        ours_ips = a.gen_batch / t_ours
        fast = ours()[:64].float()
        agree = float((fast - ref32).abs().max() / ref32.abs().max())
    rows += [("data_gen, diffusers DPMSolverMultistep 2M eager fp32, 10 NFE", f"{peer_ips:,.0f} images/s",
              f"batch {a.peer_batch}"),
             ("data_gen, dsno dpm_solver_pp-2 bf16 + channels_last + compile, 10 NFE", f"{ours_ips:,.0f} images/s",
              f"batch {a.gen_batch}; {ours_ips / peer_ips:.2f}x diffusers; max |bf16 - fp32| / max |fp32| = {agree:.2e}")]

    # 2. one-pass DSNO sampler on that backbone
    config = {"format_version": 2, "backbone": diffusers_backbone_spec(unet), "time_input": {"discrete": 1000},
              "times": TIMES, "modes": 2, "skip": [0.0] * 4, "state_shape": list(shape), "data_range": [-1, 1],
              "schedule": schedule.to_dict()}
    student = build_dsno(config).to(dev).eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        xb = torch.randn(a.peer_batch, *shape, device=dev)

        def student_call(inp):
            with torch.autocast(**autocast):
                return student(inp)

        t_b = median_time(lambda: student_call(xb), warm, iters)
        x1 = torch.randn(1, *shape, device=dev)
        lat_eager = median_time(lambda: student_call(x1), warm, iters)
        x1t = torch.randn(1, *shape, device=dev)
        lat_teacher = median_time(lambda: _solve1(teacher, x1t, ts, autocast), warm, iters)
        lat_graph = None
        if dev.type == "cuda":
            from dsno.cuda_graph import GraphedCall
            graphed = GraphedCall(student_call, x1)
            lat_graph = median_time(lambda: graphed(x1), warm, iters)
    rows += [("DSNO one pass (M=4), bf16", f"{a.peer_batch / t_b:,.0f} images/s", f"batch {a.peer_batch}"),
             ("DSNO batch-1 latency, eager", f"{lat_eager * 1e3:.2f} ms", ""),
             ("DSNO batch-1 latency, CUDA graph", "-" if lat_graph is None else f"{lat_graph * 1e3:.2f} ms",
              "" if lat_graph is None else f"{lat_teacher / lat_graph:.1f}x faster than the 10-NFE teacher solve"),
             ("teacher 10-NFE solve, batch 1 (dsno fast path)", f"{lat_teacher * 1e3:.2f} ms", "")]

    # 3. training step at batch 256
    from dsno.training.losses import TrajectoryLoss, time_weights
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=2e-4)
    loss_fn = TrajectoryLoss(time_weights(schedule, TIMES)).to(dev)
    xt = torch.randn(a.train_batch, *shape, device=dev)
    target = torch.randn(a.train_batch, len(TIMES), *shape, device=dev)

    def train_step():
        with torch.autocast(**autocast):
            loss, _ = loss_fn(student(xt), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_train = median_time(train_step, warm, iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    train_ips = a.train_batch / t_train
    rows.append(("training step, bf16 autocast + Adam", f"{train_ips:,.0f} trajectories/s",
                 f"batch {a.train_batch}; peak memory {peak:.1f} GiB"))

    # 4. loader from disk-backed shards
    from dsno.data import TrajectoryDataset, generate_dataset
    with tempfile.TemporaryDirectory() as tmp:
        n = 64 if a.smoke else 20_000
        generate_dataset(Path(tmp) / "d", solve=lambda z: z[:, None].repeat(1, len(TIMES), 1, 1, 1),
                         fingerprint={"teacher": {"name": "benchmark"}, "solver": {"name": "copy of x_T"}, "grid": TIMES,
                                      "times": TIMES},
                         num_trajectories=n,
                         shard_size=n // 4, state_shape=shape, seed=0, batch_size=1024, progress=False)
        ds = TrajectoryDataset(Path(tmp) / "d")
        loader = torch.utils.data.DataLoader(ds, batch_size=a.train_batch, shuffle=True,
                                             num_workers=0 if a.smoke else 8, pin_memory=dev.type == "cuda",
                                             drop_last=True)
        t0 = time.perf_counter()
        seen = 0
        for xb_, _ in loader:
            seen += len(xb_)
        loader_ips = seen / (time.perf_counter() - t0)
    rows.append(("trajectory loader, mmap shards, 8 workers", f"{loader_ips:,.0f} trajectories/s",
                 f"{loader_ips / train_ips:.1f}x what training consumes"))

    device = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({platform.machine()})"
    table = "\n".join(["| measurement | value | notes |", "|---|---:|---|"] + [f"| {r} | {v} | {n_} |" for r, v, n_ in rows])
    text = (f"Command: `python benchmarks/gpu.py`; device: {device}; torch {torch.__version__}; "
            f"{datetime.date.today()}; UNet2DModel {n_params / 1e6:.1f}M parameters.\n\n{table}\n")
    print(text)
    if not a.smoke and not a.no_write:
        from results_md import write_section
        write_section("gpu", "GPU stages (benchmarks/gpu.py)", text)


@torch.no_grad()
def _solve1(teacher, x, ts, autocast):
    import dsno
    with torch.autocast(**autocast):
        return dsno.solve(teacher, x, ts, solver="dpm_solver_pp", order=2)


if __name__ == "__main__":
    main()
