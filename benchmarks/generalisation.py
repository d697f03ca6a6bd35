"""Generalisation study: DSNO on noise it was trained on against noise it never saw, at equal cost.

    python benchmarks/generalisation.py --data runs/gen/trajectories --variants n2k,n8k,n32k --out gen.json

The data set (`python -m data_gen experiment=mnist_unet_cpu run_dir=runs/gen data.num_trajectories=32768`)
gives variant n<K>k its first K*1024 trajectories; the held-out noise is --held-out-data (the same teacher
and solve on noise of another data seed: `python -m data_gen experiment=mnist_unet_cpu run_dir=runs/held
seed=1 data.num_trajectories=512`; a variant on --data-m4, the same teacher at other output times, is scored
against that set's own solve of it), else the last --held-out trajectories of each data set, never trained
on. Every variant starts from the experiment's student (by default the copied teacher read as a denoiser,
M = 2) and trains with the library's loss, time weights, EMA and (AdamW) Adam +
warm-up in a plain loop on one torch thread. It ends either after --steps optimizer steps ("steps"
variants) or when its process CPU time reaches the budget ("time" variants: the first steps variant's CPU
time in this run, or --budget; CPU time, so another process on the machine does not change what is
compared). A streaming variant solves its fresh teacher trajectories inside that budget and is granted the
CPU time the teacher stage spends on the stored set it does without (measured here per trajectory).

Scored at the end on the EMA model's final sample: RMSE against the teacher solve's final state and digit
FID, on the held-out noise and on --probe training noises (the first ones, trained on by every stored-data
variant), beside the teacher solve's FID on the same noise. Prints a markdown table; --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dsno.builders import build_student, build_teacher, state_shape  # noqa: E402
from dsno.data.stream import FreshStream  # noqa: E402
from dsno.nn.temporal import set_temporal_impl  # noqa: E402
from dsno.stages.trajectories import teacher_solve  # noqa: E402
from dsno.training.ema import averaged_model  # noqa: E402
from dsno.training.losses import build_loss, time_weights  # noqa: E402
from dsno.training.module import DSNOModule  # noqa: E402
from dsno_study import compose, digit_fid, load_trajectories  # noqa: E402

# the stored set of the recipe (mnist_unet_cpu): a time variant's budget is the teacher stage for BASE_N
# trajectories plus the first steps variant's training, minus what its own stored set cost the teacher
BASE_N = 2048

# name -> options: n (stored training trajectories), stop ("steps" | "time"), steps_factor (a steps variant
# trains that many times --steps), overrides (Hydra), fresh (teacher trajectories solved per step, in place
# of stored ones), dropout (on the copied backbone's residual blocks), times (the output times kept, a
# subset of the data's), temporal (False: frozen at the identity), data ("m4": the --data-m4 set)
VARIANTS: dict[str, dict] = {
    "n2k": {"n": 2048, "stop": "steps"},
    "n8k": {"n": 8192, "stop": "steps"},
    "n32k": {"n": 32768, "stop": "steps"},
    "n2k_x3": {"n": 2048, "stop": "steps", "steps_factor": 3},
    "n8k_x3": {"n": 8192, "stop": "steps", "steps_factor": 3},
    "n32k_x3": {"n": 32768, "stop": "steps", "steps_factor": 3},
    "stream": {"n": 0, "stop": "time", "fresh": 32},
    "stream_8": {"n": 2048, "stop": "time", "fresh": 8},
    "weight_decay": {"n": 2048, "stop": "time", "overrides": ["train.weight_decay=0.05"]},
    "dropout": {"n": 2048, "stop": "time", "dropout": 0.1},
    "m1": {"n": 2048, "stop": "time", "times": [-1]},
    "no_temporal": {"n": 2048, "stop": "time", "temporal": False},
    "m4": {"n": 2048, "stop": "time", "data": "m4"},
    "m4_as_m2": {"n": 2048, "stop": "time", "data": "m4", "times": [1, 3]},
}


def student(rc, teacher, shape, opts):
    model, _ = build_student(rc, teacher, shape)
    if opts.get("dropout"):
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = float(opts["dropout"])
    if not opts.get("temporal", True):
        for p in model.temporal_parameters():
            p.data.zero_()
            p.requires_grad_(False)
    set_temporal_impl(model, rc.train.temporal_impl)
    return model


def run_variant(name: str, args, sets: dict, budget: float | None) -> dict:
    opts = VARIANTS[name]
    x_all, s_all, data_times = sets[opts.get("data", "main")]
    own_held = "held" not in sets       # held out: the set's last ones
    x_held, final_held = (x_all[-args.held_out:], s_all[-args.held_out:, -1]) if own_held else sets["held"]
    index = [i % len(data_times) for i in opts.get("times", range(len(data_times)))]
    times = [data_times[i] for i in index]
    rc = compose(args.experiment, [f"data.times=[{','.join(repr(t) for t in times)}]",
                                   f"model.modes={min(2, len(times) // 2 + 1)}", *opts.get("overrides", []),
                                   *args.override])
    teacher = build_teacher(rc.teacher)
    shape = state_shape(teacher)
    torch.manual_seed(args.seed)
    model = student(rc, teacher, shape, opts)
    loss_fn = build_loss(time_weights(teacher.schedule, times, rc.train.weight_min, rc.train.weight_max),
                         rc.train.loss, rc.train.perceptual_weights)
    module = DSNOModule(model, loss_fn, rc.train.lr, rc.train.warmup_steps, rc.train.temporal_impl,
                        rc.train.weight_decay)
    optim = module.configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    params = [p for p in model.parameters() if p.requires_grad]
    ema = averaged_model(model, rc.train.ema_decay)

    teacher_held_fid = None
    if not own_held and opts.get("data", "main") != "main":      # this set's own solve of the held-out noise
        with torch.no_grad():
            final_held = teacher_solve(rc, teacher, "cpu")(x_held)[:, -1]
        teacher_held_fid = digit_fid(final_held)
    n, fresh, bs = opts["n"], opts.get("fresh", 0), rc.train.batch_size
    stored = len(x_all) - (args.held_out if own_held else 0)
    if n > stored:
        raise SystemExit(f"{name}: needs {n} training trajectories, the data set has {stored} besides the held-out ones")
    x_train, s_train = x_all[:n], s_all[:n][:, index]
    # train.fresh_per_step's trajectories: those the teacher stage would store past the whole stored set
    solve = teacher_solve(rc, teacher, "cpu") if fresh else None
    stream = FreshStream(rc.seed, len(x_all), fresh, tuple(shape))
    gen = torch.Generator().manual_seed(args.seed)
    perm, pos, solve_cpu = torch.empty(0, dtype=torch.long), 0, 0.0

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal perm, pos, solve_cpu
        parts_x, parts_s = [], []
        if bs - fresh:
            if pos + bs - fresh > len(perm):
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + bs - fresh]
            pos += bs - fresh
            parts_x.append(x_train[idx])
            parts_s.append(s_train[idx])
        if fresh:
            c0 = time.process_time()
            x, _ = stream.inputs(step)
            with torch.no_grad():
                parts_x.append(x)
                parts_s.append(solve(x))
            solve_cpu += time.process_time() - c0
        return torch.cat(parts_x), torch.cat(parts_s)

    # equal cost: the teacher stage's CPU for n stored trajectories plus the loop's (fresh solves included)
    limit = None if opts["stop"] == "steps" else budget + args.teacher_cpu_per_traj * (BASE_N - n)
    steps, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    model.train()
    total_steps = args.steps * opts.get("steps_factor", 1)
    while (steps < total_steps) if limit is None else (time.process_time() - cpu0 < limit):
        x, s = batch(steps)
        loss, _ = loss_fn(model(x), s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if rc.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, rc.train.grad_clip)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        steps += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0

    result = {"variant": name, "options": opts, "times": times, "trained_on": n, "fresh_per_step": fresh,
              "steps": steps, "cpu_s": cpu, "wall_s": wall, "fresh_solve_cpu_s": solve_cpu,
              "budget_cpu_s": limit, "batch_size": bs, "teacher_held_out_fid": teacher_held_fid}
    ema.module.eval()
    for split, x, ref in (("held_out", x_held, final_held), ("train", x_all[:args.probe], s_all[:args.probe, -1])):
        with torch.no_grad():
            out = torch.cat([ema.module(x[i:i + 256])[:, -1] for i in range(0, len(x), 256)])
        ref = ref[:, :out.shape[1]]
        result[f"{split}_rmse"] = float((out.double() - ref.double()).square().mean().sqrt())
        result[f"{split}_fid"] = digit_fid(out)
    return result


def table(results: list[dict], teacher_fid: dict) -> str:
    head = ("| variant | trained on | fresh / step | steps | CPU s | held-out RMSE | held-out FID | FID / teacher "
            "| train-noise RMSE | train-noise FID | gap RMSE |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [f"| {r['variant']} | {r['trained_on']} | {r['fresh_per_step']} | {r['steps']} | {r['cpu_s']:.0f} | "
            f"{r['held_out_rmse']:.4f} | {r['held_out_fid']:.1f} | "
            f"{r['held_out_fid'] / (r.get('teacher_held_out_fid') or teacher_fid['held_out']):.2f}x | "
            f"{r['train_rmse']:.4f} | {r['train_fid']:.1f} | {r['held_out_rmse'] - r['train_rmse']:+.4f} |"
            for r in results]
    return "\n".join([head, *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="mnist_unet_cpu")
    ap.add_argument("--data", required=True, type=Path, help="trajectory folder made by data_gen")
    ap.add_argument("--data-m4", type=Path, default=None, help="the same teacher's trajectories at 4 output times")
    ap.add_argument("--variants", default="n2k,n8k,n32k")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of a steps variant")
    ap.add_argument("--budget", type=float, default=None,
                    help="CPU seconds of a time variant (default: the first steps variant's, run first)")
    ap.add_argument("--held-out-data", type=Path, default=None,
                    help="held-out trajectories (another data seed); default: the last --held-out of each data set")
    ap.add_argument("--held-out", type=int, default=512)
    ap.add_argument("--probe", type=int, default=512, help="training noises scored for the gap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for every variant")
    ap.add_argument("--check-flip", action="store_true",
                    help="measure how far the teacher's ODE map is from commuting with a horizontal flip")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    sets = {"main": load_trajectories(args.data)}
    if any(VARIANTS[v].get("data") == "m4" for v in names):
        if args.data_m4 is None:
            raise SystemExit("variants m4 / m4_as_m2 need --data-m4")
        sets["m4"] = load_trajectories(args.data_m4)
    x_all, s_all, times = sets["main"]
    if args.held_out_data is not None:
        x_h, s_h, times_h = load_trajectories(args.held_out_data)
        if times_h != times:
            raise SystemExit(f"--held-out-data has output times {times_h}, --data {times}")
        sets["held"] = (x_h, s_h[:, -1])
    x_held, final_held = sets["held"] if "held" in sets else (x_all[-args.held_out:], s_all[-args.held_out:, -1])
    rc = compose(args.experiment, args.override)
    teacher = build_teacher(rc.teacher)
    solve = teacher_solve(rc, teacher, "cpu")
    c0 = time.process_time()
    with torch.no_grad():       # one teacher-stage batch (data.batch_size), which also checks the stored states
        check = solve(FreshStream(rc.seed, 0, rc.data.batch_size, tuple(state_shape(teacher))).inputs(0)[0])
    args.teacher_cpu_per_traj = (time.process_time() - c0) / rc.data.batch_size
    solve_error = float((check[:, -1] - s_all[:len(check), -1]).abs().max())
    teacher_fid = {"held_out": digit_fid(final_held), "train": digit_fid(s_all[:args.probe, -1])}

    if args.check_flip:     # is a horizontal flip an augmentation the teacher's ODE map respects?
        with torch.no_grad():
            flipped = solve(x_held.flip(-1))[:, -1].flip(-1)
        gap = float((flipped.double() - final_held.double()).square().mean().sqrt())
        print(f"Flip check: the teacher's final state from flipped held-out noise, flipped back, is RMSE {gap:.4f} "
              f"from the final state of the noise itself (0 if the ODE map commuted with the flip)", flush=True)
    started, results, budget = time.time(), [], args.budget
    steps_first = sorted(names, key=lambda v: VARIANTS[v]["stop"] != "steps")
    for name in steps_first:
        if VARIANTS[name]["stop"] == "time" and budget is None:
            raise SystemExit("a time variant needs --budget or a steps variant in the same run")
        results.append(run_variant(name, args, sets, budget))
        if budget is None:
            budget = results[-1]["cpu_s"]
        print(table(results[-1:], teacher_fid).splitlines()[-1], flush=True)
    print(f"\nCommand: python benchmarks/generalisation.py {' '.join(sys.argv[1:])}")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
          f"{torch.__version__}, 1 thread; {time.strftime('%Y-%m-%d %H:%M')}, {time.time() - started:.0f} s wall; "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    held_text = (f"{len(x_held)} of {args.held_out_data}" if "held" in sets else f"the last {args.held_out}")
    print(f"Data: {len(x_all)} trajectories of {args.data} (times {times}); held out: {held_text}; "
          f"probe: the first {args.probe}. Teacher solve: {args.teacher_cpu_per_traj * 1e3:.1f} CPU ms per "
          f"trajectory (re-solved here: max |diff| {solve_error:.1e} from the stored states); its digit FID "
          f"{teacher_fid['held_out']:.1f} on the held-out noise, {teacher_fid['train']:.1f} on the probe. "
          f"Budget of a time variant: {budget if budget is None else round(budget)} CPU s.\n")
    print(table(results, teacher_fid))
    if args.out:
        args.out.write_text(json.dumps({"teacher_fid": teacher_fid, "teacher_cpu_per_traj": args.teacher_cpu_per_traj,
                                        "budget_cpu_s": budget, "results": results}, indent=2))


if __name__ == "__main__":
    main()
