"""The evaluation stage: DSNO next to every solver on the same noise, scored against a
float64 reference solution of the teacher's ODE and with torch-fidelity; a report out."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from dsno.builders import build_teacher, data_shape, prior_state, sample_shape, solver_grid
from dsno.config import RunConfig
from dsno.errors import UserError, UserFileNotFoundError
from dsno.progress import counter

log = logging.getLogger("dsno")


def seconds_per_sample(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> float:
    """Wall-clock seconds per sample of one call of fn on one representative batch, read with
    torch.utils.benchmark's timer (which synchronises an accelerator first); call it after a pass
    over the data has warmed fn up. One call, not Timer.timeit's two extra warm-up calls."""
    from torch.utils.benchmark import timer
    start = timer()
    fn(batch)
    return (timer() - start) / len(batch)


def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
               device: torch.device | str) -> torch.Tensor:
    """fn over x in batches of batch_size on `device`; the results concatenated on the CPU."""
    return torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean squared error over samples and pixels (float64)."""
    return float((x.double() - ref.double()).square().mean().sqrt())


def solver_runs(rc: RunConfig) -> list[dict[str, Any]]:
    """One entry per (eval solver, NFE budget): its label, solver, kwargs, grid steps and NFE,
    or the reason it can't meet that budget."""
    from dsno.solvers import get, nfe as nfe_of, steps_for_nfe
    runs = []
    for spec in rc.eval.solvers:
        name, label, kwargs = spec.name, spec.label(), spec.kwargs()
        stochastic = get(name).stochastic
        for budget in rc.eval.nfe:
            try:
                steps = steps_for_nfe(name, budget, **kwargs)
            except ValueError as e:
                runs.append({"method": label, "nfe": budget, "skipped": str(e)})
                continue
            runs.append({"method": label, "solver": name, "kwargs": kwargs, "steps": steps,
                         "nfe": nfe_of(name, steps, **kwargs), "stochastic": stochastic})
    return runs


def schedule_runs(rc: RunConfig) -> list[dict[str, Any]]:
    """One entry per USF schedule in <run_dir>/schedules/*.yaml (python -m dsno.search): method
    "usf <file stem>", the schedule, its NFE; or, for one that can't run here, why."""
    from dsno.solvers.usf import ScheduleError, load
    runs = []
    for path in sorted((Path(rc.run_dir) / "schedules").glob("*.yaml")):
        method = f"usf {path.stem}"
        try:
            s = load(path)
        except ScheduleError as e:
            runs.append({"method": method, "nfe": None, "skipped": str(e)})
            continue
        if abs(s.ts[-1] - rc.solver.t_end) > 1e-12:
            runs.append({"method": method, "nfe": s.cost, "skipped": f"ends at t={s.ts[-1]:g}, not solver.t_end="
                         f"{rc.solver.t_end:g}"})
            continue
        runs.append({"method": method, "nfe": s.cost, "schedule": s, "path": str(path)})
    return runs


REFERENCE_AUGMENTED = {"solver": "DOP853 (scipy, adaptive) on the augmented PF-ODE", "dtype": "float64"}


def run(rc: RunConfig, logger=None, sampler_path: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the run's exported sampler and the solvers; write metrics.json, report.md, PNGs."""
    from dsno.sampler import load_sampler
    from dsno.solvers import sample, timesteps
    from dsno.solvers.reference import reference_solve

    run_dir = Path(rc.run_dir)
    out = run_dir / "eval"
    sampler_path = Path(sampler_path) if sampler_path else run_dir / "sampler"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampler = load_sampler(sampler_path, device=device, trust_program=rc.eval.trust_program)
    teacher = build_teacher(rc.teacher).to(device)
    shape, image_shape = sample_shape(teacher), data_shape(teacher)     # a solver state; the data part of it
    c = image_shape[0]
    check_prerequisites(rc, image_shape)
    if list(sampler.config.get("image_shape", shape)) != list(shape):
        raise UserError(f"sampler at {sampler_path} makes images of shape {sampler.config['image_shape']}, "
                        f"the teacher of experiment {rc.experiment} {list(shape)}")
    if abs(sampler.times[-1] - rc.solver.t_end) > 1e-12:
        raise UserError(f"sampler's last time {sampler.times[-1]} differs from solver.t_end {rc.solver.t_end}")
    out.mkdir(parents=True, exist_ok=True)
    n, bs, dtype = rc.eval.num_samples, rc.eval.batch_size, teacher.solve_dtype
    x_T = torch.randn(n, *shape, generator=torch.Generator().manual_seed(rc.eval.seed))
    t_end = rc.solver.t_end

    def solve(grid: torch.Tensor, solver: str, as_dtype: torch.dtype = dtype, **kwargs: Any
              ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A call that solves one batch of noise on `grid` with `solver`, in `as_dtype`: the final data."""
        return lambda x: sample(teacher, prior_state(teacher, x.to(as_dtype)), grid, solver=solver,
                                **kwargs)[:, :c].float()

    reference = {**REFERENCE_AUGMENTED, "rtol": rc.eval.reference_rtol} if teacher.augmented else {
        "solver": "dpm_solver_pp-3", "steps": rc.eval.reference_steps, "dtype": "float64"}
    log.info("eval: float64 reference (%s) on %d samples", ", ".join(f"{k} {v}" for k, v in reference.items()), n)
    with torch.no_grad():
        # the state is float64; a network teacher is evaluated in its own float32 (its rounding moves the
        # reference by ~1e-7 RMSE, far below the reference's own step error, and runs 2.6x faster than float64)
        ref = in_batches(lambda x: reference_solve(teacher, prior_state(teacher, x), t_end, rc.eval.reference_steps,
                                                   rc.eval.reference_rtol)[:, :c].float(), x_T, bs, device)

    finals: dict[str, torch.Tensor] = {"reference": ref}
    rows: list[dict[str, Any]] = []

    def add_row(method: str, nfe: int, fn: Callable[[torch.Tensor], torch.Tensor], **extra: Any) -> None:
        """Run fn over all the eval noise, time one batch of it, and score it against the reference."""
        x = in_batches(fn, x_T, bs, device)
        sec = seconds_per_sample(fn, x_T[:bs].to(device))
        rows.append({"method": method, "nfe": nfe, "rmse_vs_reference": rmse(x, ref), "sec_per_sample": sec, **extra})
        finals[f"{method}@{nfe}"] = x
        log.info("eval: %-36s NFE %3d  RMSE %.4f  %.3f ms/sample", method, nfe, rows[-1]["rmse_vs_reference"],
                 sec * 1e3)
        advance(1)

    runs, schedules = solver_runs(rc), schedule_runs(rc)
    total = 2 + sum("skipped" not in r for r in runs + schedules)
    with torch.no_grad(), counter("eval", total) as advance:
        add_row("dsno", 1, lambda z: sampler(z)[:, -1, :c], note=f"one pass, backbone on M={len(sampler.times)} time points")

        from dsno.solvers import nfe as nfe_of
        grid = solver_grid(teacher, rc.solver, [float(t) for t in rc.data.times])
        teacher_opts = {**rc.solver.options, **({"schedule": rc.solver.schedule} if rc.solver.name == "usf" else {})}
        teacher_nfe = nfe_of(rc.solver.name, len(grid) - 1, order=rc.solver.order, **teacher_opts)
        add_row(f"teacher ({rc.solver.name}-{rc.solver.order})", teacher_nfe,
                solve(grid, rc.solver.name, order=rc.solver.order, **teacher_opts),
                note="the solver that made DSNO's training trajectories")

        for r in runs:
            if "skipped" in r:
                rows.append({"method": r["method"], "nfe": r["nfe"], "skipped": r["skipped"]})
                continue
            g = timesteps(teacher.grid_schedule, steps=r["steps"], spacing=rc.eval.spacing, t_end=t_end)
            if r["stochastic"]:
                # one generator of fixed seed for the pass over all the noise (the timed batch after it
                # draws on from it, which changes no result)
                gen = torch.Generator(device).manual_seed(rc.eval.seed + 1)
                add_row(r["method"], r["nfe"], solve(g, r["solver"], generator=gen, **r["kwargs"]),
                        note="stochastic (reverse SDE): converges in distribution, not to the ODE path",
                        stochastic=True)
            else:
                add_row(r["method"], r["nfe"], solve(g, r["solver"], **r["kwargs"]))

        for r in schedules:
            if "skipped" in r:
                rows.append(r)
                continue
            add_row(r["method"], r["nfe"], solve(torch.tensor(r["schedule"].ts, dtype=torch.float64), "usf",
                                                 schedule=r["schedule"]), note=f"searched schedule {r['path']}")

    if rc.eval.fidelity:
        _add_fidelity(rows, finals, image_shape, rc)
    result = {"experiment": rc.experiment, "num_samples": n, "reference": reference, "device": _device_name(),
              "rows": rows}
    from dsno.stages.report import write_report
    write_report(result, finals, out, rc.eval.grid_samples)
    from dsno import loggers
    own_logger = logger is None                # a W&B run of its own, linked to the training run
    if own_logger:
        logger = loggers.eval_logger(rc)
    loggers.log_eval(logger, result, out)
    if own_logger:
        loggers.finish(logger)
    return result


def check_prerequisites(rc: RunConfig, shape: tuple[int, ...]) -> None:
    """Fail before any work if eval will need files that are not there (RGB FID inputs)."""
    if rc.eval.fidelity and shape[0] != 1:
        from dsno.metrics.fidelity import inception_weights_path
        if rc.eval.fidelity_reference is None:
            raise UserFileNotFoundError(
                "FID for RGB images needs real reference images: set eval.fidelity_reference=FILE.npz "
                "(uint8 [N, H, W, C], e.g. the CIFAR-10 training set), or eval.fidelity=false")
        inception_weights_path(rc.eval.inception_weights)
        read_reference_images(rc.eval.fidelity_reference, shape)


def read_reference_images(path: str | Path, shape: tuple[int, ...]) -> torch.Tensor:
    """Real images for RGB FID from an .npz (first array, uint8 [N, H, W, C]) -> uint8 [N, C, H, W].
    UserError naming the file when it is unreadable, pickled, or of another shape than `shape`."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z[z.files[0]] if z.files else None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"eval.fidelity_reference={path} is not a readable .npz of uint8 images ({e})") from None
    expected = (shape[1], shape[2], shape[0])
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        got = "no array" if images is None else f"{images.dtype} {list(images.shape)}"
        raise UserError(f"eval.fidelity_reference={path} must hold uint8 images [N, {expected[0]}, {expected[1]}, "
                        f"{expected[2]}] as its first array, got {got}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _add_fidelity(rows: list[dict[str, Any]], finals: dict[str, torch.Tensor], shape, rc: RunConfig) -> None:
    """FID / KID / IS / precision-recall of every run against real images: the shipped digits with
    the digit-classifier features for 1-channel teachers, else eval.fidelity_reference with Inception."""
    from dsno.metrics.fidelity import compute_fidelity, reference_digits
    if shape[0] == 1:
        reference, extractor, name = reference_digits(shape[-1]), "digits", f"mnist{shape[-1]}"
    else:
        reference = read_reference_images(rc.eval.fidelity_reference, shape)
        extractor, name = "inception", Path(rc.eval.fidelity_reference).stem
    cache = Path(rc.run_dir).parent / ".fidelity_cache"
    for row in rows:
        if "skipped" in row:
            continue
        m = compute_fidelity(finals[f"{row['method']}@{row['nfe']}"], reference, extractor=extractor,
                             inception_weights=rc.eval.inception_weights if extractor == "inception" else None,
                             cache_dir=str(cache),
                             cache_name=f"{name}-{extractor}")
        row.update({k: m[k] for k in ("fid", "kid", "is_mean", "precision", "recall") if k in m})


def _device_name() -> str:
    import platform
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"

