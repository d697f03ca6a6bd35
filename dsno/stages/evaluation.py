"""The evaluation stage: DSNO next to every solver on the same noise (and, for a class-conditional
teacher, the same labels under its guidance), scored against a float64 reference solution of the
teacher's ODE, with torch-fidelity and, for digits, the digit classifier's label accuracy; a report out.

`run` is a straight line of named steps: load_setup -> eval_inputs -> cost_unit -> solve_reference ->
the Planned runs (dsno_run, teacher_run, solver_runs, solver_schedule_runs) -> run_methods (a MethodRun each,
whose row() is its line of metrics.json) -> FID -> eval_result -> publish."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from statistics import median
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import numpy as np
import torch

from dsno import loggers
from dsno.builders import build_teacher, data_shape, prior_state, state_shape, solver_grid
from dsno.config import RunConfig
from dsno.data.generate import trajectory_labels
from dsno.data.manifest import load_manifest
from dsno.errors import UserError, UserFileNotFoundError
from dsno.progress import counter
from dsno.run_files import CHECKPOINT_DIR, TRAIN_TIME_FILE, solver_schedules_dir
from dsno.sampler import load_sampler
from dsno.solvers import get, nfe as nfe_of, solve, steps_for_nfe, timesteps
from dsno.solvers.reference import calls_per_batch, describe, reference_solve, rmse
from dsno.solvers.usf import NAME, OPTION as SOLVER_SCHEDULE, SolverScheduleError, load
from dsno.stages.report import teacher_ratio, write_report
from dsno.teachers.conditional import bind, teacher_class_weights
from dsno.teachers.registry import teacher_kinds

log = logging.getLogger("dsno")


def timer() -> float:
    """Seconds on the performance counter once the accelerator's queued work is done (what
    torch.utils.benchmark's timer does, without importing it: its import probes for a CUDA toolkit)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def seconds_per_sample(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, repeats: int = 5,
                       unit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Wall-clock seconds per sample of fn on one representative batch, timed `repeats` times with
    `timer` (which waits for an accelerator's queued work first); call it after a pass over
    the data has warmed fn up. {"median", "min", "max"} over the repeats: one timed call can move
    several-fold between runs on a shared machine, so a verdict reads the median and shows the spread.
    unit: a second call (one teacher evaluation) timed right after fn in every repeat, so both see the
    same load; adds "per_unit", {"median", "min", "max"} over repeats of fn's time / unit's (a ratio a load
    change between repeats leaves alone), and "unit", unit's own timing."""

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
    weights = teacher_class_weights(teacher)
    return torch.from_numpy(trajectory_labels(rc.eval.seed, 0, n, weights)) if weights else None


def scores_labels(rc: RunConfig, teacher, shape: tuple[int, ...]) -> bool:
    """Whether eval scores label accuracy: a conditional teacher of the 10 digits whose kind declares
    digit data (registered with digits=True) and makes 1-channel images, for the project's digit classifier."""
    from dsno.metrics.digit_classifier import NUM_CLASSES  # deferred: loads torch-fidelity only when used
    kind = teacher_kinds().get(rc.teacher.kind)
    return (kind is not None and kind.digits and shape[0] == 1
            and getattr(teacher, "num_classes", None) == NUM_CLASSES)


@dataclass
class Planned:
    """One method at one NFE budget before it runs: the solver that runs it (None: the exported DSNO sampler),
    its options, its grid (`steps` on eval.spacing, or an explicit `grid`; neither: the teacher solve's), and
    the row's extra fields (note, stochastic); or `skipped`, why it cannot run."""

    method: str
    nfe: int | None
    skipped: str | None = None
    solver: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    grid: torch.Tensor | None = None
    stochastic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodRun:
    """What one Planned gave: its final samples [N, C, H, W] scored against the reference (RMSE), its timing
    (`seconds_per_sample` with the teacher evaluation as unit), its label accuracy (None: not scored); or
    `skipped`. `row()` is its line of metrics.json."""

    method: str
    nfe: int | None
    repeats: int = 0
    skipped: str | None = None
    samples: torch.Tensor | None = None
    rmse: float | None = None
    timing: dict[str, Any] | None = None
    label_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Its name among the final samples (and grids): "method@nfe"."""
        return f"{self.method}@{self.nfe}"

    def row(self) -> dict[str, Any]:
        if self.skipped is not None:
            return {"method": self.method, "nfe": self.nfe, "skipped": self.skipped}
        cost = self.timing["per_unit"]
        accuracy = {} if self.label_accuracy is None else {"label_accuracy": self.label_accuracy}
        return {"method": self.method, "nfe": self.nfe, "rmse_vs_reference": self.rmse,
                **timing_fields(self.timing, self.repeats), "cost_teacher_evals": cost["median"],
                "cost_teacher_evals_min": cost["min"], "cost_teacher_evals_max": cost["max"], **accuracy,
                **self.extra}


def solver_runs(rc: RunConfig) -> list[Planned]:
    """One entry per (eval solver, NFE budget): its label, solver, options, grid steps and NFE, or the reason
    it can't meet that budget."""
    runs = []
    for spec in rc.eval.solvers:
        name, label, kwargs = spec.name, spec.label(), spec.kwargs()
        stochastic = get(name).stochastic
        extra = ({"note": "stochastic (reverse SDE): converges in distribution, not to the ODE path",
                  "stochastic": True} if stochastic else {})
        for budget in rc.eval.nfe:
            try:
                steps = steps_for_nfe(name, budget, **kwargs)
            except ValueError as e:
                runs.append(Planned(label, budget, skipped=str(e)))
                continue
            runs.append(Planned(label, nfe_of(name, steps, **kwargs), solver=name, options=kwargs, steps=steps,
                                stochastic=stochastic, extra=dict(extra)))
    return runs


def solver_schedule_runs(rc: RunConfig) -> list[Planned]:
    """One entry per USF solver schedule in <run_dir>/solver_schedules/*.yaml (python -m dsno.search): method
    "usf <file stem>", the solver schedule, its NFE; or, for one that can't run here, why."""
    runs = []
    for path in sorted(solver_schedules_dir(rc.run_dir).glob("*.yaml")):
        method = f"{NAME} {path.stem}"
        try:
            s = load(path)
        except SolverScheduleError as e:
            runs.append(Planned(method, None, skipped=str(e)))
            continue
        if abs(s.ts[-1] - rc.solver.t_end) > 1e-12:
            runs.append(Planned(method, s.cost, skipped=f"ends at t={s.ts[-1]:g}, not solver.t_end={rc.solver.t_end:g}"))
            continue
        runs.append(Planned(method, s.cost, solver=NAME, options={SOLVER_SCHEDULE: s},
                            grid=torch.tensor(s.ts, dtype=torch.float64), extra={"note": f"searched solver schedule {path}"}))
    return runs


def dsno_run(sampler) -> Planned:
    """DSNO: the exported sampler's one pass."""
    return Planned("dsno", 1, extra={"note": f"one pass, backbone on M={len(sampler.times)} time points"})


def teacher_run(rc: RunConfig, grid: torch.Tensor) -> Planned:
    """The solver that made DSNO's training trajectories, on their grid."""
    options = rc.solver.solve_options()
    return Planned(f"teacher ({rc.solver.name}-{rc.solver.order})",
                   nfe_of(rc.solver.name, len(grid) - 1, order=rc.solver.order, **options), solver=rc.solver.name,
                   options={"order": rc.solver.order, **options},
                   extra={"note": "the solver that made DSNO's training trajectories"})


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
    kind = teacher_kinds().get(rc.teacher.kind)
    if kind is not None and kind.digits and shape[0] == 1:
        return {"computed": True, "reference": "the 5,000 shipped MNIST digits (the teacher's training data)",
                "path": None, "extractor": "digits", "features": "the project's digit classifier"}
    raise UserFileNotFoundError(
        f"FID needs real images of what teacher.kind={rc.teacher.kind} models (only the project's digit teachers "
        "are scored against the shipped digits): set eval.fidelity_reference=FILE.npz (uint8 [N, H, W, C], e.g. "
        "the teacher's training set), or eval.fidelity=false")


@dataclass
class Setup:
    """What every eval step reads: the config, the exported sampler, the teacher (on `device`), a solver
    state's shape and its data part's, FID's plan (`fidelity_plan`) and the teacher solve's grid."""

    rc: RunConfig
    sampler: Any
    teacher: Any
    state_shape: tuple[int, ...]       # a solver state (and a sampler's x_T): PSLD's [2C, H, W]
    image_shape: tuple[int, ...]       # the data part of a state, the image FID and the grids see: [C, H, W]
    fidelity: dict[str, Any]
    device: str
    grid: torch.Tensor

    @property
    def out(self) -> Path:
        return Path(self.rc.run_dir) / "eval"


@dataclass
class Inputs:
    """The noise [N, *state] and class labels [N] long (None: an unconditional teacher) that every method
    gets, run in batches of `batch_size` on `device`; the first batch is the timed one."""

    x_T: torch.Tensor
    labels: torch.Tensor | None
    batch_size: int
    device: str

    def through(self, fn: Method) -> torch.Tensor:
        """fn over all the noise and labels: the results concatenated on the CPU."""
        return in_batches(fn, self.x_T, self.labels, self.batch_size, self.device)

    @property
    def timed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The timed batch: its noise and labels on the device."""
        bs, device = self.batch_size, self.device
        return self.x_T[:bs].to(device), None if self.labels is None else self.labels[:bs].to(device)


@dataclass
class CostUnit:
    """One teacher evaluation (at mid-grid time t; a conditional teacher's under its guidance, on the timed
    batch's labels): the unit of every method's measured cost, and its timing alone."""

    call: Callable[[torch.Tensor], torch.Tensor]
    t: float
    timing: dict[str, Any]


@dataclass
class Reference:
    """The float64 reference solve's final samples [N, C, H, W] (float32) and its description."""

    samples: torch.Tensor
    description: dict[str, Any]


def run(rc: RunConfig, logger=None, sampler_path: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the run's exported sampler and the solvers on the same noise (and labels); write metrics.json,
    report.md, PNGs."""
    setup = load_setup(rc, sampler_path)
    inputs = eval_inputs(setup)
    unit = cost_unit(setup, inputs)
    reference = solve_reference(setup, inputs, unit)
    plans = [dsno_run(setup.sampler), teacher_run(rc, setup.grid), *solver_runs(rc), *solver_schedule_runs(rc)]
    runs = run_methods(setup, inputs, reference, unit, plans)
    rows = [r.row() for r in runs]
    finals = {"reference": reference.samples, **{r.key: r.samples for r in runs if r.samples is not None}}
    if setup.fidelity["computed"]:
        _add_fidelity(rows, finals, setup.image_shape, rc, setup.fidelity)
    result = eval_result(setup, inputs, reference, unit, runs, rows, finals)
    publish(setup, result, finals, inputs.labels, logger)
    return result


def load_setup(rc: RunConfig, sampler_path: str | Path | None) -> Setup:
    """The sampler and the teacher, checked against each other and rc before any work (FID's files too);
    creates the eval folder."""
    run_dir = Path(rc.run_dir)
    sampler_path = Path(sampler_path) if sampler_path else run_dir / "sampler"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampler = load_sampler(sampler_path, device=device, trust_program=rc.eval.trust_program)
    teacher = build_teacher(rc.teacher).to(device)
    shape, image_shape = state_shape(teacher), data_shape(teacher)     # a solver state; the data part of it
    check_prerequisites(rc, image_shape)
    fidelity = fidelity_plan(rc, image_shape)
    if list(sampler.state_shape) != list(shape):
        raise UserError(f"sampler at {sampler_path} makes images of shape {list(sampler.state_shape)}, "
                        f"the teacher of experiment {rc.experiment} {list(shape)}")
    if abs(sampler.times[-1] - rc.solver.t_end) > 1e-12:
        raise UserError(f"sampler's last time {sampler.times[-1]} differs from solver.t_end {rc.solver.t_end}")
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    grid = solver_grid(teacher, rc.solver, [float(t) for t in rc.data.times])
    return Setup(rc, sampler, teacher, shape, image_shape, fidelity, device, grid)


def eval_inputs(setup: Setup) -> Inputs:
    """eval.num_samples noise draws from eval.seed, and for a conditional teacher their labels (`eval_labels`)."""
    rc = setup.rc
    n = rc.eval.num_samples
    x_T = torch.randn(n, *setup.state_shape, generator=torch.Generator().manual_seed(rc.eval.seed))
    return Inputs(x_T, eval_labels(rc, setup.teacher, n), rc.eval.batch_size, setup.device)


def cost_unit(setup: Setup, inputs: Inputs) -> CostUnit:
    """One teacher evaluation on the timed batch, warmed up and timed alone."""
    teacher, dtype = setup.teacher, setup.teacher.solve_dtype
    x, labels = inputs.timed
    t_mid = float(setup.grid[len(setup.grid) // 2])

    def teacher_eval(z: torch.Tensor) -> torch.Tensor:
        return bind(teacher, labels).eps(prior_state(teacher, z.to(dtype)), t_mid)

    with torch.no_grad():
        teacher_eval(x)                                                 # warm-up
        timing = seconds_per_sample(teacher_eval, x, setup.rc.eval.timing_repeats)
    return CostUnit(teacher_eval, t_mid, timing)


def solve_reference(setup: Setup, inputs: Inputs, unit: CostUnit) -> Reference:
    """The float64 reference solve of every noise draw (a conditional teacher bound to its labels, under its
    guidance), with a progress bar and an up-front estimate of its time."""
    rc, teacher, c = setup.rc, setup.teacher, setup.image_shape[0]
    n, bs = len(inputs.x_T), inputs.batch_size
    steps = reference_steps(rc, teacher.network is not None)
    reference = describe(teacher, steps, rc.eval.reference_rtol)
    per_batch = calls_per_batch(teacher, steps)
    estimate = "" if per_batch is None else f", about {per_batch * n * unit.timing['median']:.0f} s"
    log.info("eval: float64 reference (%s) on %d samples%s (one teacher evaluation: %.3f ms/sample)",
             ", ".join(f"{k} {v}" for k, v in reference.items()), n, estimate, unit.timing["median"] * 1e3)
    calls = None if per_batch is None else per_batch * -(-n // bs)
    with torch.no_grad(), counter("eval: reference", calls) as tick:
        # the state is float64; a network teacher is evaluated in its own float32 (its rounding moves the
        # reference by ~1e-7 RMSE, far below the reference's own step error, and runs 2.6x faster than float64)
        hook = teacher.register_forward_pre_hook(reference_progress(tick, calls))
        try:
            ref = inputs.through(lambda x, y: reference_solve(bind(teacher, y), prior_state(teacher, x), rc.solver.t_end,
                                                              steps, rc.eval.reference_rtol)[:, :c].float())
        finally:
            hook.remove()
    return Reference(ref, reference)


def method_call(setup: Setup, p: Planned) -> Method:
    """The call that runs `p` on one batch of noise and labels: the final data [b, C, H, W] float32. DSNO's
    sampler, or p's solver on its grid under the teacher's guidance (a stochastic one with a generator of
    fixed seed for the pass over all the noise; the timed batches after it draw on from it, which changes no
    result)."""
    rc, teacher, c = setup.rc, setup.teacher, setup.image_shape[0]
    if p.solver is None:
        return lambda z, y: setup.sampler(z, y)[:, -1, :c]
    if p.grid is not None:
        grid = p.grid
    elif p.steps is not None:
        grid = timesteps(teacher.grid_schedule, steps=p.steps, spacing=rc.eval.spacing, t_end=rc.solver.t_end)
    else:
        grid = setup.grid
    options = dict(p.options)
    if p.stochastic:
        options["generator"] = torch.Generator(setup.device).manual_seed(rc.eval.seed + 1)
    dtype = teacher.solve_dtype
    return lambda x, y: solve(teacher, prior_state(teacher, x.to(dtype)), grid, solver=p.solver, cond=y,
                               **options)[:, :c].float()


def run_methods(setup: Setup, inputs: Inputs, reference: Reference, unit: CostUnit,
                plans: list[Planned]) -> list[MethodRun]:
    """Every planned method over all the noise (and labels), with a progress bar: `run_method` each."""
    labelled = inputs.labels is not None and scores_labels(setup.rc, setup.teacher, setup.image_shape)
    runs: list[MethodRun] = []
    with torch.no_grad(), counter("eval", len(plans)) as advance:
        for p in plans:
            runs.append(run_method(setup, inputs, reference, unit, p, labelled))
            r = runs[-1]
            if r.skipped is None:
                t, cost = r.timing, r.timing["per_unit"]
                log.info("eval: [%d/%d] %-36s NFE %3d  RMSE %.4f  %.3f ms/sample (median of %d, %.3f-%.3f), %.2f "
                         "teacher evaluations", len(runs), len(plans), r.method, r.nfe, r.rmse, t["median"] * 1e3,
                         r.repeats, t["min"] * 1e3, t["max"] * 1e3, cost["median"])
            advance(1)
    return runs


def run_method(setup: Setup, inputs: Inputs, reference: Reference, unit: CostUnit, p: Planned,
               labelled: bool) -> MethodRun:
    """Run p over all the noise, time it `eval.timing_repeats` times on the timed batch, each time with one
    teacher evaluation right after it (its cost in teacher evaluations), score it against the reference and,
    when `labelled`, for label accuracy."""
    if p.skipped is not None:
        return MethodRun(p.method, p.nfe, skipped=p.skipped)
    fn, repeats = method_call(setup, p), setup.rc.eval.timing_repeats
    x = inputs.through(fn)
    batch, labels = inputs.timed
    timing = seconds_per_sample(lambda z: fn(z, labels), batch, repeats, unit.call)
    accuracy = None
    if labelled:
        from dsno.metrics.fidelity import label_accuracy  # deferred: loads torch-fidelity only when used
        accuracy = label_accuracy(x, inputs.labels)
    return MethodRun(p.method, p.nfe, repeats, samples=x, rmse=rmse(x, reference.samples), timing=timing,
                     label_accuracy=accuracy, extra=dict(p.extra))


def eval_result(setup: Setup, inputs: Inputs, reference: Reference, unit: CostUnit, runs: list[MethodRun],
                rows: list[dict[str, Any]], finals: dict[str, torch.Tensor]) -> dict[str, Any]:
    """metrics.json's content: the rows, the reference, the teacher evaluation timed beside DSNO (the first run),
    FID's reference, what distillation cost, DSNO's FID against the teacher solve's (`teacher_ratio`); for a conditional run the labels and guidance every method got."""
    rc, teacher = setup.rc, setup.teacher
    first = next(r for r in runs if r.timing is not None)
    result = {"experiment": rc.experiment, "num_samples": len(inputs.x_T), "reference": reference.description,
              "device": _device_name(),
              "teacher_eval": {**timing_fields(first.timing["unit"], first.repeats), "t": unit.t},
              "fidelity": {k: v for k, v in setup.fidelity.items() if k != "extractor"},
              "distillation": distillation_cost(Path(rc.run_dir), Path(rc.data.dir)), "rows": rows,
              "dsno_vs_teacher": teacher_ratio(rows)}
    if inputs.labels is not None:        # a conditional run: what every method was asked for
        result["conditions"] = {"guidance": float(getattr(teacher, "guidance", 0.0)),
                                "class_weights": teacher_class_weights(teacher), "seed": rc.eval.seed,
                                "labels": inputs.labels.tolist()}
        if any(r.label_accuracy is not None for r in runs):
            from dsno.metrics.fidelity import label_accuracy  # deferred: loads torch-fidelity only when used
            result["conditions"]["reference_label_accuracy"] = label_accuracy(finals["reference"], inputs.labels)
    return result


def publish(setup: Setup, result: dict[str, Any], finals: dict[str, torch.Tensor], labels: torch.Tensor | None,
            logger=None) -> None:
    """Write the report (metrics.json, report.md, figures) and log it to W&B: to `logger`, else to an eval run of
    its own linked to the training run."""
    rc = setup.rc
    write_report(result, finals, setup.out, rc.eval.grid_samples, labels)
    own_logger = logger is None
    if own_logger:
        logger = loggers.eval_logger(rc)
    loggers.log_eval(logger, result, setup.out)
    if own_logger:
        loggers.finish(logger)


def check_prerequisites(rc: RunConfig, shape: tuple[int, ...]) -> None:
    """Fail before any work if eval will need files that are not there (FID's reference images and the
    Inception weights), or FID would have no reference of what the teacher models."""
    plan = fidelity_plan(rc, shape)
    if plan["computed"] and plan["extractor"] == "inception":
        from dsno.metrics.fidelity import inception_weights_path  # deferred: loads torch-fidelity only when used
        inception_weights_path(rc.eval.inception_weights)
        read_reference_images(plan["path"], shape)


def read_reference_images(path: str | Path, shape: tuple[int, ...]) -> torch.Tensor:
    """Real images for FID from an .npz (first array, uint8 [N, H, W, C]) -> uint8 [N, C, H, W].
    UserError naming the file when it is unreadable, pickled, or of another shape than `shape`."""
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
    from dsno.metrics.fidelity import compute_fidelity, reference_digits  # deferred: loads torch-fidelity only when used
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
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"

