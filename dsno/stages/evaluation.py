"""The evaluation stage: DSNO next to every solver on the same noise, scored against a
float64 reference solution of the teacher's ODE and with torch-fidelity; a report out."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from statistics import median
from typing import Any, Callable

import torch

from dsno.builders import build_teacher, data_shape, prior_state, sample_shape, solver_grid
from dsno.config import RunConfig
from dsno.errors import UserError, UserFileNotFoundError
from dsno.progress import counter

log = logging.getLogger("dsno")


def seconds_per_sample(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, repeats: int = 5,
                       unit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Wall-clock seconds per sample of fn on one representative batch, timed `repeats` times with
    torch.utils.benchmark's timer (which synchronises an accelerator first); call it after a pass over
    the data has warmed fn up. {"median", "min", "max"} over the repeats: one timed call can move
    several-fold between runs on a shared machine, so a verdict reads the median and shows the spread.
    unit: a second call (one teacher evaluation) timed right after fn in every repeat, so both see the
    same load; adds "per_unit", {"median", "min", "max"} over repeats of fn's time / unit's (a ratio a load
    change between repeats leaves alone), and "unit", unit's own timing."""
    from torch.utils.benchmark import timer

    def timed(f: Callable[[torch.Tensor], torch.Tensor]) -> float:
        start = timer()
        f(batch)
        return (timer() - start) / len(batch)

    pairs = [(timed(fn), timed(unit) if unit is not None else 1.0) for _ in range(repeats)]
    out: dict[str, Any] = _spread([a for a, _ in pairs])
    if unit is not None:
        out.update(per_unit=_spread([a / b for a, b in pairs]), unit=_spread([b for _, b in pairs]))
    return out


def _spread(times: list[float]) -> dict[str, float]:
    return {"median": median(times), "min": min(times), "max": max(times)}


def timing_fields(t: dict[str, float], repeats: int) -> dict[str, Any]:
    """A row's timing keys: sec_per_sample (the median), its min and max over `repeats` timed calls."""
    return {"sec_per_sample": t["median"], "sec_per_sample_min": t["min"], "sec_per_sample_max": t["max"],
            "timing_repeats": repeats}


Method = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]   # (noise, labels or None) -> samples


def in_batches(fn: Method, x: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
               device: torch.device | str) -> torch.Tensor:
    """fn(noise, labels) over x (and its labels [N], or None) in batches of batch_size on `device`; the
    results concatenated on the CPU."""
    return torch.cat([fn(x[i:i + batch_size].to(device), None if labels is None else labels[i:i + batch_size].to(device))
                      .cpu() for i in range(0, len(x), batch_size)])


def eval_labels(rc: RunConfig, teacher, n: int) -> torch.Tensor | None:
    """The class label of each of the n eval samples, long [n]: drawn from (eval.seed, i) with the teacher's
    own class weights by the data stage's rule (`trajectory_labels`); None for an unconditional teacher."""
    from dsno.data.generate import trajectory_labels
    from dsno.stages.trajectories import teacher_class_weights
    weights = teacher_class_weights(teacher)
    return torch.from_numpy(trajectory_labels(rc.eval.seed, 0, n, weights)) if weights else None


def scores_labels(rc: RunConfig, teacher, shape: tuple[int, ...]) -> bool:
    """Whether eval scores label accuracy: a conditional teacher of the 10 digits whose kind declares
    digit data (registered with digits=True) and makes 1-channel images, for the project's digit classifier."""
    from dsno.metrics.digit_classifier import NUM_CLASSES
    from dsno.teachers.registry import teacher_kinds
    kind = teacher_kinds().get(rc.teacher.kind)
    return (kind is not None and kind.digits and shape[0] == 1
            and getattr(teacher, "num_classes", None) == NUM_CLASSES)


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
    from dsno.solvers.usf import NAME, ScheduleError, load
    runs = []
    for path in sorted((Path(rc.run_dir) / "schedules").glob("*.yaml")):
        method = f"{NAME} {path.stem}"
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


REFERENCE_STEPS_CLOSED_FORM = 500   # a closed-form teacher (no network) costs microseconds per evaluation
REFERENCE_STEPS_MIN = 50            # a network teacher: at least this many DPM-Solver++ 3M steps ...
REFERENCE_STEPS_PER_NFE = 5         # ... and 5x the largest eval budget (3rd order: (1/5)^3 of its step error)


def reference_steps(rc: RunConfig, has_network: bool) -> int:
    """The reference solve's steps: eval.reference_steps when set; else sized by the teacher's cost: 500 for a
    closed-form teacher, for a network max(50, 5 x the largest eval budget), at most 500."""
    if rc.eval.reference_steps is not None:
        return rc.eval.reference_steps
    if not has_network:
        return REFERENCE_STEPS_CLOSED_FORM
    return min(REFERENCE_STEPS_CLOSED_FORM, max(REFERENCE_STEPS_MIN, REFERENCE_STEPS_PER_NFE * max(rc.eval.nfe)))


def reference_progress(tick: Callable[[int], None], calls: int | None, lines: int = 10) -> Callable[..., None]:
    """A forward pre-hook for the teacher during the reference solve: advances the bar (`tick`) and logs
    about `lines` progress lines over `calls` teacher evaluations (every 200 when the count is unknown)."""
    every, done = max(1, (calls or 2000) // lines), [0]

    def hook(*_: Any) -> None:
        tick(1)
        done[0] += 1
        if done[0] % every == 0:
            log.info("eval: reference %d%s teacher evaluations", done[0], f"/{calls}" if calls else "")
    return hook


def fidelity_plan(rc: RunConfig, shape: tuple[int, ...]) -> dict[str, Any]:
    """What FID is computed against, before any work: {"computed": False, "why"} or {"computed": True,
    "reference" (words), "path" (eval.fidelity_reference or None), "extractor" ("digits" | "inception")}.
    A named eval.fidelity_reference is always the one used (Inception features); without one only a teacher
    trained on the shipped digits (its kind registered with digits=True, 1 channel) is scored against them
    (digit-classifier features); any other teacher gets UserFileNotFoundError."""
    if not rc.eval.fidelity:
        return {"computed": False, "why": "eval.fidelity=false"}
    path = rc.eval.fidelity_reference
    if path is not None:
        return {"computed": True, "reference": f"the real images of eval.fidelity_reference={path}", "path": path,
                "extractor": "inception", "features": "Inception-v3 (torch-fidelity's inception-v3-compat)"}
    from dsno.teachers.registry import teacher_kinds
    kind = teacher_kinds().get(rc.teacher.kind)
    if kind is not None and kind.digits and shape[0] == 1:
        return {"computed": True, "reference": "the 5,000 shipped MNIST digits (the teacher's training data)",
                "path": None, "extractor": "digits", "features": "the project's digit classifier"}
    raise UserFileNotFoundError(
        f"FID needs real images of what teacher.kind={rc.teacher.kind} models (only the project's digit teachers "
        "are scored against the shipped digits): set eval.fidelity_reference=FILE.npz (uint8 [N, H, W, C], e.g. "
        "the teacher's training set), or eval.fidelity=false")


def run(rc: RunConfig, logger=None, sampler_path: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the run's exported sampler and the solvers; write metrics.json, report.md, PNGs."""
    from dsno.sampler import load_sampler
    from dsno.solvers import nfe as nfe_of
    from dsno.solvers import sample, timesteps, usf
    from dsno.solvers.reference import calls_per_batch, describe, reference_solve, rmse
    from dsno.stages.trajectories import teacher_class_weights
    from dsno.teachers.conditional import bind

    run_dir = Path(rc.run_dir)
    out = run_dir / "eval"
    sampler_path = Path(sampler_path) if sampler_path else run_dir / "sampler"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampler = load_sampler(sampler_path, device=device, trust_program=rc.eval.trust_program)
    teacher = build_teacher(rc.teacher).to(device)
    shape, image_shape = sample_shape(teacher), data_shape(teacher)     # a solver state; the data part of it
    c = image_shape[0]
    check_prerequisites(rc, image_shape)
    fidelity = fidelity_plan(rc, image_shape)
    if list(sampler.config.get("image_shape", shape)) != list(shape):
        raise UserError(f"sampler at {sampler_path} makes images of shape {sampler.config['image_shape']}, "
                        f"the teacher of experiment {rc.experiment} {list(shape)}")
    if abs(sampler.times[-1] - rc.solver.t_end) > 1e-12:
        raise UserError(f"sampler's last time {sampler.times[-1]} differs from solver.t_end {rc.solver.t_end}")
    out.mkdir(parents=True, exist_ok=True)
    n, bs, dtype, repeats = rc.eval.num_samples, rc.eval.batch_size, teacher.solve_dtype, rc.eval.timing_repeats
    x_T = torch.randn(n, *shape, generator=torch.Generator().manual_seed(rc.eval.seed))
    labels = eval_labels(rc, teacher, n)         # every method gets the same labels (None: unconditional)
    t_end = rc.solver.t_end

    def solve(grid: torch.Tensor, solver: str, as_dtype: torch.dtype = dtype, **kwargs: Any) -> Method:
        """A call that solves one batch of noise (and its labels, under the teacher's guidance) on `grid`
        with `solver`, in `as_dtype`: the final data."""
        return lambda x, y: sample(teacher, prior_state(teacher, x.to(as_dtype)), grid, solver=solver, cond=y,
                                   **kwargs)[:, :c].float()

    grid = solver_grid(teacher, rc.solver, [float(t) for t in rc.data.times])
    t_mid = float(grid[len(grid) // 2])

    timed_labels = None if labels is None else labels[:bs].to(device)     # the labels of the timed batch

    def teacher_eval(x: torch.Tensor) -> torch.Tensor:
        """One teacher evaluation (mid-grid; a conditional teacher's under its guidance, on the labels of the
        timed batch): the unit of every method's measured cost."""
        return bind(teacher, timed_labels).eps(prior_state(teacher, x.to(dtype)), t_mid)

    with torch.no_grad():
        teacher_eval(x_T[:bs].to(device))                            # warm-up
        one_eval = seconds_per_sample(teacher_eval, x_T[:bs].to(device), repeats)
    steps = reference_steps(rc, teacher.network is not None)
    reference = describe(teacher, steps, rc.eval.reference_rtol)
    per_batch = calls_per_batch(teacher, steps)
    estimate = "" if per_batch is None else f", about {per_batch * n * one_eval['median']:.0f} s"
    log.info("eval: float64 reference (%s) on %d samples%s (one teacher evaluation: %.3f ms/sample)",
             ", ".join(f"{k} {v}" for k, v in reference.items()), n, estimate, one_eval["median"] * 1e3)
    calls = None if per_batch is None else per_batch * -(-n // bs)
    with torch.no_grad(), counter("eval: reference", calls) as tick:
        # the state is float64; a network teacher is evaluated in its own float32 (its rounding moves the
        # reference by ~1e-7 RMSE, far below the reference's own step error, and runs 2.6x faster than float64)
        hook = teacher.register_forward_pre_hook(reference_progress(tick, calls))
        try:
            ref = in_batches(lambda x, y: reference_solve(bind(teacher, y), prior_state(teacher, x), t_end, steps,
                                                          rc.eval.reference_rtol)[:, :c].float(), x_T, labels, bs,
                             device)
        finally:
            hook.remove()

    finals: dict[str, torch.Tensor] = {"reference": ref}
    with_accuracy = labels is not None and scores_labels(rc, teacher, image_shape)
    if with_accuracy:
        from dsno.metrics.fidelity import label_accuracy
    rows: list[dict[str, Any]] = []
    units: list[dict[str, float]] = []       # the teacher evaluation's timing beside each row's

    def add_row(method: str, nfe: int, fn: Method, **extra: Any) -> None:
        """Run fn over all the eval noise (and labels), time it `repeats` times on one batch, each time with one
        teacher evaluation right after it (its cost in teacher evaluations), and score it against the reference
        (and the digit classifier, for label accuracy)."""
        x = in_batches(fn, x_T, labels, bs, device)
        t = seconds_per_sample(lambda z: fn(z, timed_labels), x_T[:bs].to(device), repeats, teacher_eval)
        cost = t["per_unit"]
        accuracy = {"label_accuracy": label_accuracy(x, labels)} if labels is not None and with_accuracy else {}
        rows.append({"method": method, "nfe": nfe, "rmse_vs_reference": rmse(x, ref), **timing_fields(t, repeats),
                     "cost_teacher_evals": cost["median"], "cost_teacher_evals_min": cost["min"],
                     "cost_teacher_evals_max": cost["max"], **accuracy, **extra})
        units.append(t["unit"])
        finals[f"{method}@{nfe}"] = x
        log.info("eval: [%d/%d] %-36s NFE %3d  RMSE %.4f  %.3f ms/sample (median of %d, %.3f-%.3f), %.2f teacher "
                 "evaluations", len(rows), total, method, nfe, rows[-1]["rmse_vs_reference"], t["median"] * 1e3,
                 repeats, t["min"] * 1e3, t["max"] * 1e3, cost["median"])
        advance(1)

    runs, schedules = solver_runs(rc), schedule_runs(rc)
    total = 2 + len(runs) + len(schedules)
    with torch.no_grad(), counter("eval", total) as advance:
        add_row("dsno", 1, lambda z, y: sampler(z, y)[:, -1, :c], note=f"one pass, backbone on M={len(sampler.times)} time points")

        teacher_opts = rc.solver.solve_options()
        teacher_nfe = nfe_of(rc.solver.name, len(grid) - 1, order=rc.solver.order, **teacher_opts)
        add_row(f"teacher ({rc.solver.name}-{rc.solver.order})", teacher_nfe,
                solve(grid, rc.solver.name, order=rc.solver.order, **teacher_opts),
                note="the solver that made DSNO's training trajectories")

        for r in runs:
            if "skipped" in r:
                rows.append({"method": r["method"], "nfe": r["nfe"], "skipped": r["skipped"]})
                advance(1)
                continue
            g = timesteps(teacher.grid_schedule, steps=r["steps"], spacing=rc.eval.spacing, t_end=t_end)
            if r["stochastic"]:
                # one generator of fixed seed for the pass over all the noise (the timed batches after it
                # draw on from it, which changes no result)
                gen = torch.Generator(device).manual_seed(rc.eval.seed + 1)
                add_row(r["method"], r["nfe"], solve(g, r["solver"], generator=gen, **r["kwargs"]),
                        note="stochastic (reverse SDE): converges in distribution, not to the ODE path",
                        stochastic=True)
            else:
                add_row(r["method"], r["nfe"], solve(g, r["solver"], **r["kwargs"]))

        for r in schedules:
            if "skipped" in r:
                rows.append(r)
                advance(1)
                continue
            add_row(r["method"], r["nfe"], solve(torch.tensor(r["schedule"].ts, dtype=torch.float64), usf.NAME,
                                                 schedule=r["schedule"]), note=f"searched schedule {r['path']}")

    if fidelity["computed"]:
        _add_fidelity(rows, finals, image_shape, rc, fidelity)
    result = {"experiment": rc.experiment, "num_samples": n, "reference": reference, "device": _device_name(),
              "teacher_eval": {**timing_fields(units[0], repeats), "t": t_mid},     # timed beside DSNO
              "fidelity": {k: v for k, v in fidelity.items() if k != "extractor"},
              "distillation": distillation_cost(run_dir, Path(rc.data.dir)), "rows": rows}
    if labels is not None:        # a conditional run: what every method was asked for
        result["conditions"] = {"guidance": float(getattr(teacher, "guidance", 0.0)),
                                "class_weights": teacher_class_weights(teacher), "seed": rc.eval.seed,
                                "labels": labels.tolist()}
        if with_accuracy:
            result["conditions"]["reference_label_accuracy"] = label_accuracy(ref, labels)
    from dsno.stages.report import write_report
    write_report(result, finals, out, rc.eval.grid_samples, labels)
    from dsno import loggers
    own_logger = logger is None                # a W&B run of its own, linked to the training run
    if own_logger:
        logger = loggers.eval_logger(rc)
    loggers.log_eval(logger, result, out)
    if own_logger:
        loggers.finish(logger)
    return result


def check_prerequisites(rc: RunConfig, shape: tuple[int, ...]) -> None:
    """Fail before any work if eval will need files that are not there (FID's reference images and the
    Inception weights), or FID would have no reference of what the teacher models."""
    plan = fidelity_plan(rc, shape)
    if plan["computed"] and plan["extractor"] == "inception":
        from dsno.metrics.fidelity import inception_weights_path
        inception_weights_path(rc.eval.inception_weights)
        read_reference_images(plan["path"], shape)


def read_reference_images(path: str | Path, shape: tuple[int, ...]) -> torch.Tensor:
    """Real images for FID from an .npz (first array, uint8 [N, H, W, C]) -> uint8 [N, C, H, W].
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


def _add_fidelity(rows: list[dict[str, Any]], finals: dict[str, torch.Tensor], shape, rc: RunConfig,
                  plan: dict[str, Any]) -> None:
    """FID / KID / IS / precision-recall of every run against the real images of `plan` (fidelity_plan)."""
    from dsno.metrics.fidelity import compute_fidelity, reference_digits
    if plan["extractor"] == "digits":
        reference, name = reference_digits(shape[-1]), f"mnist{shape[-1]}"
    else:
        reference, name = read_reference_images(plan["path"], shape), Path(plan["path"]).stem
    cache = Path(rc.run_dir).parent / ".fidelity_cache"
    done = [row for row in rows if "skipped" not in row]
    for i, row in enumerate(done, 1):
        log.info("eval: FID [%d/%d] %s NFE %d", i, len(done), row["method"], row["nfe"])
        m = compute_fidelity(finals[f"{row['method']}@{row['nfe']}"], reference, extractor=plan["extractor"],
                             inception_weights=rc.eval.inception_weights if plan["extractor"] == "inception" else None,
                             cache_dir=str(cache), cache_name=f"{name}-{plan['extractor']}")
        row.update({k: m[k] for k in ("fid", "kid", "kid_std", "is_mean", "precision", "recall") if k in m})


def distillation_cost(run_dir: Path, data_dir: Path) -> dict[str, Any]:
    """What distillation cost, from what its stages record: data generation's wall time (the trajectory
    manifest's created -> updated, when complete) and training's (TRAIN_TIME_FILE); a missing record is left out."""
    from datetime import datetime
    from dsno.data.manifest import load_manifest
    from dsno.run_files import CHECKPOINT_DIR, TRAIN_TIME_FILE
    cost: dict[str, Any] = {}
    try:
        m = load_manifest(data_dir)
        if m.complete and m.created and m.updated:
            cost["data_seconds"] = (datetime.fromisoformat(m.updated) - datetime.fromisoformat(m.created)).total_seconds()
            cost["num_trajectories"] = m.num_trajectories
    except (OSError, ValueError):         # no data set here (eval of a copied sampler): nothing to read
        pass
    try:
        cost.update(json.loads((run_dir / CHECKPOINT_DIR / TRAIN_TIME_FILE).read_text()))
    except (OSError, ValueError):
        pass
    return cost


def _device_name() -> str:
    import platform
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"

