"""DSNO study: learning curves at equal training time, each variant scored against the float64 reference.

    python benchmarks/dsno_study.py --experiment mnist_unet --data runs/study_unet/trajectories \\
        --budget 150 --variants denoised_teacher,state_fresh,denoised_fresh,plain_m1

Every variant trains on the same trajectories (made by `python -m data_gen experiment=...`) for the
same training time: its step cost is timed first (5 steps), and it trains budget / cost steps, so a
busy machine during a run does not change what is compared. The library's own builders, loss, EMA
and Adam + warm-up are used (the LightningModule's math in a plain loop). At 0, 1/4, 1/2, 3/4 and 1
of the steps the EMA model's final sample is scored on the eval noise (seed 1234, as `eval.py`) by its
RMSE against the float64 reference of the teacher's ODE (DPM-Solver++ 3M, --reference-steps
logSNR steps). Prints a markdown table; --out writes the numbers as JSON.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# the starting points the variants build on: a copied teacher read as a denoiser, a fresh backbone read
# as a denoiser, a fresh backbone regressing the states
TEACHER_DENOISED = ["model.backbone.type=teacher", "model.parameterization=denoised"]
FRESH_DENOISED = ["model.backbone.type=unet", "model.parameterization=denoised"]
FRESH_STATE = ["model.backbone.type=unet", "model.parameterization=state"]

# name -> (Hydra overrides, study options): the variants the table reports
VARIANTS: dict[str, tuple[list[str], dict]] = {
    "denoised_teacher": (TEACHER_DENOISED, {}),
    "denoised_teacher_fft": (TEACHER_DENOISED, {"temporal_impl": "fft"}),
    "denoised_fresh": (FRESH_DENOISED, {}),
    "state_fresh": (FRESH_STATE, {}),
    "denoised_teacher_m2": (TEACHER_DENOISED, {"time_index": [1, 3]}),
    "denoised_teacher_m1_notemporal": (TEACHER_DENOISED, {"time_index": [-1], "temporal": False}),
    "denoised_teacher_m4_notemporal": (TEACHER_DENOISED, {"temporal": False}),
    "denoised_teacher_lr3e-4": ([*TEACHER_DENOISED, "train.lr=3e-4"], {}),
    "denoised_teacher_lr2e-3": ([*TEACHER_DENOISED, "train.lr=2e-3"], {}),
    "denoised_teacher_l1": ([*TEACHER_DENOISED, "train.loss=l1"], {}),
    "denoised_teacher_bs64": ([*TEACHER_DENOISED, "train.batch_size=64"], {}),
    "denoised_teacher_tau0.3": ([*TEACHER_DENOISED, "model.denoise_time=0.3"], {}),
    "denoised_teacher_tau0.7": ([*TEACHER_DENOISED, "model.denoise_time=0.7"], {}),
    "denoised_teacher_flatw": ([*TEACHER_DENOISED, "train.weight_max=1"], {}),
    "denoised_fresh_c48": ([*FRESH_DENOISED, "model.backbone.base_channels=48"], {}),
    "denoised_fresh_m1_notemporal": (FRESH_DENOISED, {"time_index": [-1], "temporal": False}),
    "state_fresh_m1_notemporal": (FRESH_STATE, {"time_index": [-1], "temporal": False}),
    "denoised_fresh_fresh_data": (FRESH_DENOISED, {"fresh_data": True}),
    "state_fresh_fresh_data": (FRESH_STATE, {"fresh_data": True}),
    "state_fresh_c48": ([*FRESH_STATE, "model.backbone.base_channels=48"], {}),
    "state_fresh_flatw": ([*FRESH_STATE, "train.weight_max=1"], {}),
}


def compose(experiment: str, overrides: list[str]):
    from dsno.config import compose as compose_config, validate
    return validate(compose_config(f"experiment={experiment}", "logger=csv", *overrides))


def load_trajectories(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(x_T [N, C, H, W], states [N, M, C, H, W], times) of a data set, all in memory."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    xs = sorted(data_dir.glob("shard-*.x_T.npy"))
    x_T = torch.from_numpy(np.concatenate([np.load(p) for p in xs]))
    states = torch.from_numpy(np.concatenate([np.load(str(p).replace(".x_T.", ".states.")) for p in xs]))
    times = manifest.get("fingerprint", {}).get("times") or manifest.get("times")
    return x_T.float(), states.float(), [float(t) for t in times]


def reference(rc, teacher, shape, n: int, steps: int, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(eval noise x_T [n, ...], float64 reference final samples [n, ...]), cached in `cache`."""
    from dsno.solvers import solve, timesteps
    x_T = torch.randn(n, *shape, generator=torch.Generator().manual_seed(rc.eval.seed))
    if cache.is_file():
        ref = torch.load(cache, weights_only=True)
        if ref.shape[0] == n:
            return x_T, ref
    grid = timesteps(teacher.schedule, steps=steps, spacing="logsnr", t_end=rc.solver.t_end)
    with torch.no_grad():   # a float64 solve; a network teacher stays in float32, as in eval
        ref = torch.cat([solve(teacher, x_T[i:i + 128].double(), grid, solver="dpm_solver_pp", order=3).float()
                         for i in range(0, n, 128)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, cache)
    return x_T, ref


def fresh_batches(rc, teacher, shape, times, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` new trajectories of an exact teacher (the teacher stage's solve), for fresh data each epoch."""
    from dsno.builders import solver_grid
    from dsno.stages.trajectories import make_solve
    solve = make_solve(teacher, rc.solver, solver_grid(teacher, rc.solver, times), times)
    x_T = torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))
    return x_T, torch.cat([solve(x_T[i:i + 512]) for i in range(0, count, 512)])


def train_variant(name: str, experiment: str, data, ref_set, budget: float, seed: int,
                  extra: list[str], timing_steps: int = 3, steps: int | None = None, fid: bool = False) -> dict:
    from dsno.builders import build_student, build_teacher, state_shape
    from dsno.nn.temporal import set_temporal_impl
    from dsno.training.ema import averaged_model
    from dsno.training.losses import build_loss, time_weights

    overrides, opts = VARIANTS[name]
    x_all, s_all, times_all = data
    index = [i % len(times_all) for i in opts.get("time_index", range(len(times_all)))]
    times = [times_all[i] for i in index]
    # a run config needs M >= 2: M = 1 (plain distillation) is built from the M = 2 config's last branch
    run_times = times if len(times) > 1 else [times_all[0], times[0]]
    rc = compose(experiment, [*overrides, f"data.times=[{','.join(repr(t) for t in run_times)}]",
                              f"model.modes={min(2, len(times) // 2 + 1)}", *extra])
    teacher = build_teacher(rc.teacher)
    shape = state_shape(teacher)
    torch.manual_seed(seed)
    if len(times) > 1:
        model, _ = build_student(rc, teacher, shape)
    else:
        from dsno.builders import student_config
        from dsno.nn import build_dsno, load_backbone_weights
        config = student_config(rc, teacher, shape)
        config.update({k: config[k][-1:] for k in ("times", "skip", "out_scale", "in_scale", "net_times")}, modes=1)
        model = build_dsno(config)
        if rc.model.backbone.type == "teacher":
            load_backbone_weights(model, teacher.network)
    if not opts.get("temporal", True):
        for p in model.temporal_parameters():       # zero and frozen: every temporal layer is the identity
            p.data.zero_()
            p.requires_grad_(False)
    set_temporal_impl(model, opts.get("temporal_impl", rc.train.temporal_impl))
    weights = time_weights(teacher.schedule, times, rc.train.weight_min, rc.train.weight_max)
    loss_fn = build_loss(weights, rc.train.loss, rc.train.perceptual_weights)
    ema = averaged_model(model, rc.train.ema_decay)
    set_temporal_impl(ema.module, opts.get("temporal_impl", rc.train.temporal_impl))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=rc.train.lr)
    warm = max(1, rc.train.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    x_T, states = x_all, s_all[:, index]
    eval_x, ref = ref_set

    def final_samples() -> torch.Tensor:
        ema.module.eval()
        with torch.no_grad():
            return torch.cat([ema.module(eval_x[i:i + 256])[:, -1] for i in range(0, len(eval_x), 256)])

    def score() -> float:
        return float((final_samples().double() - ref.double()).square().mean().sqrt())

    gen = torch.Generator().manual_seed(seed)
    order = {"perm": torch.randperm(len(x_T), generator=gen), "pos": 0, "epoch": 0, "x": x_T, "s": states}
    bs = rc.train.batch_size

    def train_step() -> None:
        if order["pos"] + bs > len(order["perm"]):
            order["epoch"] += 1
            if opts.get("fresh_data"):
                order["x"], order["s"] = fresh_batches(rc, teacher, shape, times, len(x_all),
                                                       seed + 1000 * order["epoch"])
            order["perm"], order["pos"] = torch.randperm(len(order["x"]), generator=gen), 0
        idx = order["perm"][order["pos"]:order["pos"] + bs]
        order["pos"] += bs
        model.train()
        loss, _ = loss_fn(model(order["x"][idx]), order["s"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if rc.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, rc.train.grad_clip)
        opt.step()
        sched.step()
        ema.update_parameters(model)

    # equal training time: the step count is the budget over this variant's measured step cost
    # (timed on a throw-away copy of the optimiser state, so the run itself starts at step 0)
    state = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict()))
    for _ in range(2):
        train_step()
    t0 = time.perf_counter()
    for _ in range(timing_steps):
        train_step()
    sec_per_step = (time.perf_counter() - t0) / timing_steps
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    sched.load_state_dict(state[2])
    ema.load_state_dict(state[3])
    order.update(perm=torch.randperm(len(x_T), generator=torch.Generator().manual_seed(seed)), pos=0, epoch=0,
                 x=x_T, s=states)
    total = steps if steps else max(4, int(budget / sec_per_step))
    marks = [round(total * f) for f in (0.25, 0.5, 0.75, 1.0)]
    curve, started = [(0, score())], time.perf_counter()
    for step in range(1, total + 1):
        train_step()
        if step in marks:
            curve.append((step, score()))
    wall = time.perf_counter() - started
    step = total
    with torch.no_grad():
        xb = eval_x[:256]
        ema.module(xb)
        t0 = time.perf_counter()
        ema.module(xb)
        per_sample_ms = (time.perf_counter() - t0) / len(xb) * 1e3
    fid = digit_fid(final_samples()) if fid and shape[0] == 1 else None
    return {"variant": name, "overrides": overrides, "options": opts, "times": times, "steps": step,
            "sec_per_step": sec_per_step, "wall_s": wall, "curve": curve, "ms_per_sample": per_sample_ms,
            "params": sum(p.numel() for p in model.parameters()), "fid": fid}


def digit_fid(samples: torch.Tensor) -> float:
    """FID of 1-channel samples in [-1, 1] against the shipped real digits, with the digit features (as eval)."""
    from dsno.metrics.fidelity import compute_fidelity, reference_digits
    return compute_fidelity(samples, reference_digits(samples.shape[-1]), extractor="digits",
                            metrics=("fid",))["fid"]


def table(results: list[dict]) -> str:
    head = ("| variant | M | params | steps | s/step | RMSE step 0 | 1/4 | 1/2 | 3/4 | end | ms/sample | FID end |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [f"| {r['variant']} | {len(r['times'])} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
            f"{r['sec_per_step']:.3f} | " + " | ".join(f"{c[1]:.4f}" for c in r["curve"]) +
            f" | {r['ms_per_sample']:.2f} | " + ("-" if r.get("fid") is None else f"{r['fid']:.1f}") + " |"
            for r in results]
    return "\n".join([head, *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="mnist_unet")
    ap.add_argument("--data", required=True, type=Path, help="trajectory folder made by data_gen")
    ap.add_argument("--variants", default="denoised_teacher,denoised_fresh,state_fresh")
    ap.add_argument("--budget", type=float, default=120.0, help="training seconds per variant")
    ap.add_argument("--steps", type=int, default=None, help="equal steps instead (each variant's s/step is reported)")
    ap.add_argument("--holdout", type=int, default=0,
                    help="score against the last HOLDOUT stored trajectories' final states (not trained on) "
                         "instead of the float64 reference")
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--reference-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for every variant")
    ap.add_argument("--fid", action="store_true", help="also score the end's final samples by FID (digit teachers)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dsno.builders import build_teacher, state_shape
    rc = compose(args.experiment, args.override)
    teacher = build_teacher(rc.teacher)
    shape = state_shape(teacher)
    data = load_trajectories(args.data)
    if args.holdout:
        x_T, states, times = data
        ref_set = (x_T[-args.holdout:], states[-args.holdout:, -1])
        data = (x_T[:-args.holdout], states[:-args.holdout], times)
    else:
        ref_set = reference(rc, teacher, shape, args.eval_samples, args.reference_steps,
                            args.data.parent / f"study_reference_{args.eval_samples}_{args.reference_steps}.pt")
    started = time.time()
    results = []
    for name in args.variants.split(","):
        results.append(train_variant(name, args.experiment, data, ref_set, args.budget, args.seed, args.override,
                                     steps=args.steps, fid=args.fid))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    print(f"\nCommand: python benchmarks/dsno_study.py {' '.join(sys.argv[1:])}")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
          f"{torch.__version__}, {args.threads} threads; {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{time.time() - started:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    target = (f"the teacher solve's final states of the last {args.holdout} stored trajectories (held out)"
              if args.holdout else f"the float64 reference ({args.reference_steps} steps)")
    length = f"{args.steps} steps" if args.steps else f"{args.budget:.0f} s of training"
    print(f"Data: {len(data[0])} trajectories from {args.data}; RMSE of the EMA model's final sample on "
          f"{len(ref_set[0])} noises against {target}, at 0, 1/4, 1/2, 3/4, 1 of {length}.\n")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
