"""Solver schedules of the unified sampling framework (USF, Liu et al. 2024): one set of
decisions per step, read and written as YAML, and the executor that runs them.

A solver schedule of N steps holds the times ts[0] > ... > ts[N] and, for step i (ts[i] -> ts[i+1]):

- prediction: "data" (x0, the data form of the exponential integrator) or "noise" (eps);
- order k (1..4): the Taylor order in lambda = log(alpha / sigma) of the update
      x_t = ratio x_s - gain (z phi_1(z) f_s + sum_{j=1}^{k-1} z phi_{j+1}(z) D_j),
  D_j ~ h^j f^(j)(lambda_s), h = lambda_t - lambda_s (see `coefficients.exponential_frame`);
- points: the past evaluations the derivatives are estimated from, as lags (1 = the one at
  ts[i-1]); est_order n: D_1..D_n solve the Taylor system f_m - f_s = sum_j r_m^j / j! D_j over
  the points (r_m = (lambda_m - lambda_s) / h; least squares when there are more points than n);
  the update needs n >= k - 1;
- relax, coef: the first derivative's weight: "linear" scales D_1 by 1 + coef h (coef = 0: the
  plain Taylor update); "bh1" / "bh2" (UniPC's B(h) = h / e^h - 1) weight D_1 by B(h) / 2 in a
  second-order update (DPM-Solver++'s "midpoint" is bh2) and leave higher orders exact;
  "adams": no derivatives; f is replaced by its mean over the step as if the grid were uniform,
  z phi_1(z) sum_m w_m f_m with the fixed Adams-Bashforth weights of the k evaluations at
  lags (0, points...) (Adams-Moulton with the corrector's point at lag -1); k - 1 points, est_order
  k - 1. With noise prediction this is iPNDM (`from_solver("ipndm")`);
- corrector: "none" or "pseudo": evaluate the teacher at the predicted state, then redo the update
  one order higher with that evaluation as one more point (r = 1), UniC-style; the next step reuses
  the evaluation, so it costs no extra model evaluation (not allowed on the last step, where it would).

afs (analytic first step): "none", "zero" (x0 := 0 at ts[0], i.e. eps := x_T / sigma_T) or
"mean" (x0 := the data mean) replaces the first model evaluation: NFE = N - 1 instead of N.
Every fixed multistep solver of the library that the framework covers is a solver schedule
(`from_solver`), and runs to the same result. ("schedule" alone is the noise schedule, alpha_t and sigma_t.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml

from dsno.atomic import atomic_write_text
from dsno.errors import UserError
from dsno.renamed import refuse_renamed
from dsno.run_files import SOLVER_SCHEDULES_DIR
from dsno.solvers.coefficients import adams_weights, exponential_frame, phi
from dsno.solvers.core import Point, Trajectory, combine, grid_points, step_orders
from dsno.solvers.registry import OptionError, register

NAME = "usf"                     # the registry name; a searched solver schedule runs with this solver
OPTION = "solver_schedule"       # the solver's option (and the config key solver.solver_schedule): its YAML path
FINGERPRINT_KEY = "solver_schedule_sha256"      # what identifies it in a data set's fingerprint
PREDICTIONS = ("data", "noise")
RELAXATIONS = ("linear", "bh1", "bh2", "adams")
CORRECTORS = ("none", "pseudo")
AFS = ("none", "zero", "mean")
MAX_ORDER = 4
_TOP_KEYS = ("nfe", "afs", "timesteps", "steps", "score", "cost", "search")
_STEP_KEYS = ("prediction", "order", "points", "est_order", "relax", "coef", "corrector")


class SolverScheduleError(UserError):
    """A solver schedule is invalid; the message names the file / key and the fix."""


@dataclass(frozen=True)
class Step:
    """The decisions of one step (see the module doc)."""

    prediction: str = "data"
    order: int = 1
    points: tuple[int, ...] = ()
    est_order: int = 0
    relax: str = "linear"
    coef: float = 0.0
    corrector: str = "none"


@dataclass(frozen=True)
class SolverSchedule:
    """ts: N + 1 decreasing times of the noise schedule; steps: N Steps; afs; nfe: the declared model
    evaluations (checked); info: free metadata kept in the YAML (score, cost, search)."""

    ts: tuple[float, ...]
    steps: tuple[Step, ...]
    afs: str = "none"
    nfe: int | None = None
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def cost(self) -> int:
        """Model evaluations a run costs: one at the start of every step, but the first with AFS."""
        return len(self.steps) - (self.afs != "none")

    @property
    def max_order(self) -> int:
        return max(s.order for s in self.steps)

    def declared(self) -> "SolverSchedule":
        """This solver schedule with its nfe declared (= cost)."""
        return replace(self, nfe=self.cost)


def _where(source: str | None) -> str:
    return f"solver schedule {source}" if source else "solver schedule"


def validate(s: SolverSchedule, source: str | None = None) -> SolverSchedule:
    """Return `s` if it is a valid solver schedule, else raise SolverScheduleError (one line, naming the key)."""
    w = _where(source)
    ts = list(s.ts)
    if len(ts) < 2:
        raise SolverScheduleError(f"{w}: timesteps must hold at least 2 times (start and end), got {len(ts)}")
    for i, t in enumerate(ts):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise SolverScheduleError(f"{w}: timesteps[{i}] = {t!r} must be a finite number")
    for i in range(len(ts) - 1):
        if not ts[i] > ts[i + 1]:
            raise SolverScheduleError(f"{w}: timesteps must strictly decrease (noise to data), but timesteps[{i + 1}] = "
                                f"{ts[i + 1]!r} follows timesteps[{i}] = {ts[i]!r}; sort them and drop repeats")
    if len(s.steps) != len(ts) - 1:
        raise SolverScheduleError(f"{w}: {len(ts)} timesteps make {len(ts) - 1} steps, but steps lists {len(s.steps)}; "
                            f"give one entry per step")
    if s.afs not in AFS:
        raise SolverScheduleError(f"{w}: afs={s.afs!r} must be one of {', '.join(AFS)}")
    for i, st in enumerate(s.steps):
        _validate_step(st, i, len(s.steps), w)
    if s.nfe is not None and (isinstance(s.nfe, bool) or s.nfe != s.cost):
        raise SolverScheduleError(f"{w}: declares nfe={s.nfe!r}, but its {len(s.steps)} steps with afs={s.afs} cost "
                            f"{s.cost} model evaluations; set nfe: {s.cost}")
    return s


def _validate_step(st: Step, i: int, n_steps: int, w: str) -> None:
    key = f"{w}: steps[{i}]"
    if st.prediction not in PREDICTIONS:
        raise SolverScheduleError(f"{key}.prediction={st.prediction!r} must be one of {', '.join(PREDICTIONS)}")
    if isinstance(st.order, bool) or not isinstance(st.order, int) or not 1 <= st.order <= MAX_ORDER:
        raise SolverScheduleError(f"{key}.order={st.order!r} must be an integer in 1..{MAX_ORDER}")
    if isinstance(st.est_order, bool) or not isinstance(st.est_order, int) or st.est_order < 0:
        raise SolverScheduleError(f"{key}.est_order={st.est_order!r} must be an integer >= 0")
    if st.order - 1 > st.est_order:
        raise SolverScheduleError(f"{key}.order={st.order} needs est_order >= {st.order - 1} derivatives, got "
                            f"est_order={st.est_order}; raise est_order or lower the order")
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in st.points) or \
            len(set(st.points)) != len(st.points):
        raise SolverScheduleError(f"{key}.points={list(st.points)} must be distinct lags >= 1 (1 = the previous "
                            f"evaluation)")
    if len(st.points) < st.est_order:
        raise SolverScheduleError(f"{key}.est_order={st.est_order} needs at least {st.est_order} past points, got "
                            f"points={list(st.points)}")
    if st.points and max(st.points) > i:
        have = f"only {i} exist" if i else "none exist"
        raise SolverScheduleError(f"{key}.points={list(st.points)} uses the evaluation {max(st.points)} steps back, but "
                            f"{have} before step {i}; use lags <= {i} and an order <= {i + 1}")
    if st.relax not in RELAXATIONS:
        raise SolverScheduleError(f"{key}.relax={st.relax!r} must be one of {', '.join(RELAXATIONS)}")
    if isinstance(st.coef, bool) or not isinstance(st.coef, (int, float)) or not math.isfinite(st.coef):
        raise SolverScheduleError(f"{key}.coef={st.coef!r} must be a finite number")
    if st.relax == "adams" and not (st.est_order == len(st.points) == st.order - 1):
        raise SolverScheduleError(f"{key}: relax=adams of order={st.order} takes exactly {st.order - 1} points and "
                            f"est_order={st.order - 1} (one past evaluation per order above 1), got "
                            f"points={list(st.points)}, est_order={st.est_order}")
    if st.relax != "linear" and st.coef != 0.0:
        raise SolverScheduleError(f"{key}.coef={st.coef!r} applies to relax=linear only; set coef: 0 for relax={st.relax}")
    if st.corrector not in CORRECTORS:
        raise SolverScheduleError(f"{key}.corrector={st.corrector!r} must be one of {', '.join(CORRECTORS)}")
    if st.corrector == "pseudo" and i == n_steps - 1:
        raise SolverScheduleError(f"{key}.corrector=pseudo on the last step would cost one more model evaluation; "
                            f"set corrector: none there")


# --- YAML ----------------------------------------------------------------------------------

def to_dict(s: SolverSchedule) -> dict[str, Any]:
    """The YAML mapping of a solver schedule (plain Python types)."""
    out: dict[str, Any] = {"nfe": s.cost, "afs": s.afs, "timesteps": [float(t) for t in s.ts],
                           "steps": [{**asdict(st), "points": list(st.points), "coef": float(st.coef)}
                                     for st in s.steps]}
    out.update({k: v for k, v in s.info.items() if k in _TOP_KEYS})
    return out


def from_dict(d: Any, source: str | None = None) -> SolverSchedule:
    """A validated SolverSchedule from its mapping (as `to_dict` writes it)."""
    w = _where(source)
    if not isinstance(d, Mapping):
        raise SolverScheduleError(f"{w}: must be a mapping with keys nfe, afs, timesteps, steps; got {type(d).__name__}")
    unknown = sorted(set(d) - set(_TOP_KEYS))
    if unknown:
        raise SolverScheduleError(f"{w}: unknown key {unknown[0]!r}; the keys are: {', '.join(_TOP_KEYS)}")
    for k in ("nfe", "timesteps", "steps"):
        if k not in d:
            raise SolverScheduleError(f"{w}: missing key {k!r} (a solver schedule needs nfe, timesteps and steps)")
    if not isinstance(d["timesteps"], (list, tuple)) or not isinstance(d["steps"], (list, tuple)):
        raise SolverScheduleError(f"{w}: timesteps and steps must be lists")
    steps = []
    for i, st in enumerate(d["steps"]):
        if not isinstance(st, Mapping):
            raise SolverScheduleError(f"{w}: steps[{i}] must be a mapping of {', '.join(_STEP_KEYS)}")
        bad = sorted(set(st) - set(_STEP_KEYS))
        if bad:
            raise SolverScheduleError(f"{w}: steps[{i}] has unknown key {bad[0]!r}; the keys are: {', '.join(_STEP_KEYS)}")
        if "order" not in st:
            raise SolverScheduleError(f"{w}: steps[{i}] lacks 'order'")
        order = st["order"]
        points = st.get("points", list(range(1, order)) if isinstance(order, int) else [])
        if not isinstance(points, (list, tuple)):
            raise SolverScheduleError(f"{w}: steps[{i}].points={points!r} must be a list of lags")
        est = st.get("est_order", len(points))
        steps.append(Step(prediction=st.get("prediction", "data"), order=order, points=tuple(points), est_order=est,
                          relax=st.get("relax", "linear"), coef=st.get("coef", 0.0),
                          corrector=st.get("corrector", "none")))
    info = {k: d[k] for k in ("score", "cost", "search") if k in d}
    ts = d["timesteps"]
    ts = tuple(float(t) if isinstance(t, int) and not isinstance(t, bool) else t for t in ts)
    return validate(SolverSchedule(ts=ts, steps=tuple(steps), afs=d.get("afs", "none"), nfe=d["nfe"], info=info), source)


def load(src: "str | os.PathLike | SolverSchedule | Mapping") -> SolverSchedule:
    """A validated SolverSchedule from a YAML path, a mapping or a SolverSchedule."""
    if isinstance(src, SolverSchedule):
        return validate(src)
    if isinstance(src, Mapping):
        return from_dict(src)
    if not isinstance(src, (str, os.PathLike)):
        raise SolverScheduleError(f"solver_schedule must be a YAML path, a mapping or a dsno.solvers.usf.SolverSchedule, "
                                  f"got "
                            f"{type(src).__name__}")
    p = Path(src)
    if not p.is_file():
        raise SolverScheduleError(f"solver schedule file {p} does not exist; give the YAML that python -m dsno.search "
                                  f"wrote (runs/<experiment>/{SOLVER_SCHEDULES_DIR}/nfe<N>.yaml)")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SolverScheduleError(f"solver schedule {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(d, str(p))


def save(s: SolverSchedule, path: "str | os.PathLike") -> Path:
    """Write `s` as YAML atomically (`dsno.atomic`); returns the path."""
    validate(s)
    p = Path(path)
    atomic_write_text(p, yaml.safe_dump(to_dict(s), sort_keys=False, default_flow_style=None, width=120))
    return p


# --- the fixed solvers as solver schedules ---------------------------------------------------------

def from_solver(name: str, ts: Sequence[float], order: int = 3, **options: Any) -> SolverSchedule:
    """The solver schedule of a fixed multistep solver on grid ts (the same result as
    `solve(..., solver=name, order=order, **options)`): ddim; dpm_solver_pp (multistep,
    solver_type midpoint / heun, lower_order_final); unipc (variant, use_corrector, predict_x0,
    lower_order_final); deis (variant="logrho", lower_order_final); ipndm (lower_order_final)."""
    ts = tuple(float(t) for t in (ts.tolist() if isinstance(ts, torch.Tensor) else ts))
    n = len(ts) - 1
    lof = options.pop("lower_order_final", True)
    if name == "ddim":
        _no_options(name, options)
        steps = [Step(order=1)] * n
    elif name == "dpm_solver_pp":
        solver_type = options.pop("solver_type", "midpoint")
        _no_options(name, options)
        relax = {"midpoint": "bh2", "heun": "linear"}[solver_type]
        steps = [_multistep(k, "data", relax) for k in step_orders(order, n, lof)]
    elif name == "unipc":
        variant = options.pop("variant", "bh2")
        corr = "pseudo" if options.pop("use_corrector", True) else "none"
        pred = "data" if options.pop("predict_x0", True) else "noise"
        _no_options(name, options)
        steps = [replace(_multistep(k, pred, variant), corrector=corr if i < n - 1 else "none")
                 for i, k in enumerate(step_orders(order, n, lof))]
    elif name == "deis":
        if options.pop("variant", "tab") != "logrho":
            raise SolverScheduleError("deis is a USF solver schedule with variant='logrho' only (the others interpolate in t or rho)")
        _no_options(name, options)
        steps = [_multistep(k, "noise", "linear") for k in step_orders(order, n, lof)]
    elif name == "ipndm":
        if options.pop("denoise_to_zero", False):
            raise SolverScheduleError("ipndm's denoise_to_zero has no USF solver schedule equivalent (a solver schedule ends "
                                      "at its last "
                                "time); set denoise_to_zero=False")
        _no_options(name, options)
        steps = [_multistep(k, "noise", "adams") for k in step_orders(order, n, lof)]
    else:
        raise SolverScheduleError(f"solver {name!r} has no USF solver schedule; use one of ddim, dpm_solver_pp, unipc, deis, "
                            f"ipndm")
    return validate(SolverSchedule(ts=ts, steps=tuple(steps)).declared())


def _multistep(k: int, prediction: str, relax: str) -> Step:
    return Step(prediction=prediction, order=k, points=tuple(range(1, k)), est_order=k - 1, relax=relax)


def _no_options(name: str, options: Mapping[str, Any]) -> None:
    if options:
        raise SolverScheduleError(f"option {next(iter(options))!r} of {name} has no USF solver schedule equivalent")


# --- the executor ----------------------------------------------------------------------------

def derivative_operator(rs: Sequence[float], n: int) -> np.ndarray:
    """M [n, m] with D = M (f_m - f_s)_m: the (least-squares) solution of the Taylor system
    f_m - f_s = sum_{j=1}^n r_m^j / j! D_j over m = len(rs) points, D_j ~ h^j f^(j). float64."""
    a = np.array([[r**j / math.factorial(j) for j in range(1, n + 1)] for r in rs], dtype=np.float64)
    if len(rs) == n:
        return np.linalg.solve(a, np.eye(n))
    return np.linalg.pinv(a)


def update_weights(z: float, h: float, rs: Sequence[float], order: int, n: int, relax: str, coef: float
                   ) -> list[float]:
    """Weights (w_s, w_1, ..., w_m) of f_s and the m point values in
    x_t = ratio x_s - gain (w_s f_s + sum_m w_m f_m); a Taylor update of `order` with the first
    n derivatives estimated from the points at rs (see the module doc); relax="adams": rs are the
    equal-step node positions (minus the lags) and the update is z phi_1(z) times their
    Adams weights. Pure float64."""
    if relax == "adams":
        return [float(v) for v in z * phi(1, z) * adams_weights(rs)]
    taylor = [z * phi(j + 1, z) for j in range(1, order)]            # weights of D_1..D_{k-1}
    if order >= 2:
        if relax == "linear":
            taylor[0] *= 1.0 + coef * h
        elif order == 2:
            b_h = z if relax == "bh1" else math.expm1(z)
            taylor[0] = 0.5 * b_h
    out = np.zeros(len(rs) + 1)
    out[0] = z * phi(1, z)
    if order >= 2:
        m = derivative_operator(rs, n)[: order - 1]                  # [k-1, points]
        per_point = np.asarray(taylor) @ m
        out[1:] = per_point
        out[0] -= per_point.sum()
    return [float(v) for v in out]


def data_mean(teacher) -> torch.Tensor:
    """The teacher's data mean (for afs=mean): its `data_mean` capability (a mixture's sum_k w_k mu_k)."""
    mean = getattr(teacher, "data_mean", None)      # any teacher-like object may be solved, not only a Teacher
    if mean is None:
        raise SolverScheduleError(f"afs=mean needs the data mean, which a {type(teacher).__name__} teacher does not provide "
                            f"(set teacher.data_mean to a tensor of one sample's shape); or use afs: zero")
    return torch.as_tensor(mean)


class _Eval:
    """One model evaluation at a point: both predictions (x0, eps), from one call."""

    __slots__ = ("lam", "x0", "eps")

    def __init__(self, lam: float, x0: torch.Tensor, eps: torch.Tensor):
        self.lam, self.x0, self.eps = lam, x0, eps

    def get(self, prediction: str) -> torch.Tensor:
        return self.x0 if prediction == "data" else self.eps


def _evaluate(teacher, x: torch.Tensor, p: Point) -> _Eval:
    if getattr(teacher, "prediction", "x0") == "eps":
        eps = teacher.eps(x, p.t)
        return _Eval(p.lam, (x - p.sigma * eps) / p.alpha, eps)
    x0 = teacher.x0(x, p.t)
    return _Eval(p.lam, x0, (x - p.alpha * x0) / p.sigma)


def _analytic(teacher, x: torch.Tensor, p: Point, afs: str) -> _Eval:
    x0 = torch.zeros_like(x) if afs == "zero" else \
        data_mean(teacher).to(device=x.device, dtype=x.dtype).expand_as(x).clone()
    return _Eval(p.lam, x0, (x - p.alpha * x0) / p.sigma)


def _update(x: torch.Tensor, s: Point, t: Point, st: Step, cur: _Eval, pts: list[_Eval], lags: Sequence[int],
            order: int, n: int) -> torch.Tensor:
    """One update from s to t with the evaluations pts at lags (-1: the corrector's, at t)."""
    data = st.prediction == "data"
    ratio, gain, z = exponential_frame(s.lam, t.lam, (s.alpha, t.alpha), (s.sigma, t.sigma), data)
    h = t.lam - s.lam
    rs = [-float(lag) for lag in lags] if st.relax == "adams" else [(e.lam - s.lam) / h for e in pts]
    w = update_weights(z, h, rs, order, n, st.relax, st.coef)
    terms = [(ratio, x), (-gain * w[0], cur.get(st.prediction))]
    terms += [(-gain * wm, e.get(st.prediction)) for wm, e in zip(w[1:], pts)]
    return combine(terms)


def run(teacher, x: torch.Tensor, solver_schedule: SolverSchedule, return_trajectory: bool = False) -> torch.Tensor:
    """Run a (validated) solver schedule from x = x_T [B, ...] at ts[0]; the state at ts[-1] [B, ...], or
    the states at every time [N + 1, B, ...]. Model evaluations: solver_schedule.cost."""
    pts = grid_points(teacher.schedule, torch.tensor(solver_schedule.ts, dtype=torch.float64))
    traj = Trajectory(x, return_trajectory)
    evals: list[_Eval] = []
    pending: _Eval | None = (_analytic(teacher, x, pts[0], solver_schedule.afs)
                              if solver_schedule.afs != "none" else None)
    for i, (s, t, st) in enumerate(zip(pts[:-1], pts[1:], solver_schedule.steps)):
        cur = pending if pending is not None else _evaluate(teacher, x, s)
        evals.append(cur)
        past = [evals[i - lag] for lag in st.points]
        x_pred = _update(x, s, t, st, cur, past, st.points, st.order, st.est_order)
        pending = None
        if st.corrector == "pseudo":
            pending = _evaluate(teacher, x_pred, t)
            x = _update(x, s, t, st, cur, [pending] + past, (-1, *st.points), st.order + 1, st.est_order + 1)
        else:
            x = x_pred
        traj.add(x)
    return traj.result(x)


# --- the registry entry -----------------------------------------------------------------------

def _solver_schedule_of(options: Mapping[str, Any]) -> SolverSchedule:
    if options.get(OPTION) is None:
        raise SolverScheduleError(f"solver 'usf' needs {OPTION}=PATH (a YAML of python -m dsno.search) or a "
                                  f"dsno.solvers.usf.SolverSchedule; from a config: solver.{OPTION}=PATH")
    return load(options[OPTION])


def _cost(steps: int, order: int, options: Mapping[str, Any]) -> int:
    return steps - (_solver_schedule_of(options).afs != "none")


def _fingerprint(options: Mapping[str, Any]) -> dict[str, Any]:
    """The solver schedule's decisions, not its path, identify what the solver computes."""
    d = to_dict(_solver_schedule_of(options))
    decisions = {k: d[k] for k in ("afs", "timesteps", "steps")}
    return {FINGERPRINT_KEY: hashlib.sha256(json.dumps(decisions, sort_keys=True).encode()).hexdigest()[:16]}


def _check(options: Mapping[str, Any], order: int, t_end: float, times: Sequence[float]) -> None:
    """A valid solver schedule within `order`, ending at t_end and passing through the output times; else
    OptionError."""
    given = options.get(OPTION)
    if given is None:
        raise OptionError(OPTION, None, f"solver=usf needs solver.{OPTION}=PATH (a YAML of python -m dsno.search)")
    try:
        s = load(given)
    except SolverScheduleError as e:
        raise OptionError(OPTION, OptionError.NO_VALUE, str(e)) from None
    if s.max_order > order:
        raise OptionError("order", order, f"the solver schedule uses Taylor order {s.max_order}; set solver.order="
                          f"{s.max_order}")
    if abs(s.ts[-1] - t_end) > 1e-12:
        raise OptionError(OPTION, given, f"ends at t={s.ts[-1]:g}, not solver.t_end={t_end:g}")
    missing = [t for t in times if min(abs(t - u) for u in s.ts) > 1e-9]
    if missing:
        raise OptionError(OPTION, given, f"does not pass through the output times {missing} of data.times; "
                          f"search one that does: python -m dsno.search nfe=N "
                          f"'search.pin_times={[t for t in times[:-1]]}'")


@register(NAME, orders=(1, 2, 3, 4), cost=_cost, grid=lambda o: list(_solver_schedule_of(o).ts),
          fingerprint=_fingerprint, check=_check,
          cost_rule="1 per step, minus 1 with an analytic first step; the solver schedule fixes its steps")
def usf(teacher, x: torch.Tensor, ts: torch.Tensor, *, order: int = 4, return_trajectory: bool = False,
        solver_schedule: Any = None) -> torch.Tensor:
    """Run a USF solver schedule (a YAML path, a mapping or a SolverSchedule); ts may be omitted (the solver
    schedule carries its timesteps) or must equal them. order: the highest Taylor order it may use."""
    plan = _solver_schedule_of({OPTION: solver_schedule})
    if len(ts) != len(plan.ts) or float(torch.max(torch.abs(ts - torch.tensor(plan.ts, dtype=ts.dtype)))) > 1e-12:
        raise SolverScheduleError(f"ts ({len(ts)} times) differs from the solver schedule's timesteps "
                                  f"({len(plan.ts)}); omit ts, a solver schedule carries its own")
    if plan.max_order > order:
        raise SolverScheduleError(f"the solver schedule uses Taylor order {plan.max_order}, above order={order}; "
                                  f"raise order (solver.order) to {plan.max_order}")
    return run(teacher, x, plan, return_trajectory)


__getattr__ = refuse_renamed("dsno.solvers.usf", {"Schedule": "SolverSchedule", "ScheduleError": "SolverScheduleError"})
