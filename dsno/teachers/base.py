"""The Teacher interface: a scalar schedule (VP, VE or flow) plus a denoiser with a declared
parameterization.

A solver only ever calls `teacher.eps(x, t)`, `teacher.x0(x, t)` or `teacher.v(x, t)`.
x: [B, ...] (any dtype); t: scalar or [B] schedule time. Outputs have x's shape and dtype.

Predictions, with x = alpha x0 + sigma eps: "eps", "x0", "v" (VP's velocity alpha eps - sigma x0,
VP schedules only) and "flow_velocity" (a flow-matching model's u = dx/dt = eps - x0, for
`FlowSchedule` only, where alpha = 1 - t and sigma = t).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any, Callable

import torch

from dsno.errors import UserError
from dsno.schedules import FlowSchedule, Schedule, VPSchedule
from dsno.teachers.labels import (GuidanceError, LabelError, check_guidance, check_labels, require_unconditional,
                                  row_labels, teacher_name)


class TeacherLoadError(UserError):
    """A teacher's file or folder is missing, unreadable or of another kind than teacher.kind."""

PREDICTIONS = ("eps", "x0", "v", "flow_velocity")


class PredictionError(UserError):
    """A prediction kind that does not belong to the teacher's schedule (v off VP, flow_velocity off flow)."""


def check_prediction(schedule: Any, kind: str) -> None:
    """Refuse, in one line, a prediction kind that means nothing for this schedule."""
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {kind!r}")
    if kind == "v" and not isinstance(schedule, VPSchedule):
        raise PredictionError(f"prediction 'v' is VP's velocity alpha eps - sigma x0 and needs a VPSchedule, got "
                              f"{schedule!r}; a flow-matching model predicts 'flow_velocity'")
    if kind == "flow_velocity" and not isinstance(schedule, FlowSchedule):
        raise PredictionError(f"prediction 'flow_velocity' (u = eps - x0 of x_t = (1 - t) x0 + t eps) needs "
                              f"dsno.FlowSchedule(), got {schedule!r}; a VP model's velocity is prediction 'v'")


def batch_times(t: Any, x: torch.Tensor) -> torch.Tensor:
    """t (scalar or [B]) as a float64 tensor of shape [B]."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def convert(pred: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
            src: str, dst: str) -> torch.Tensor:
    """Convert a prediction between eps / x0 / v / flow_velocity, given x = alpha x0 + sigma eps.

    alpha, sigma: [B] (float64 is fine); v = alpha eps - sigma x0 (VP); flow_velocity
    u = eps - x0 assumes alpha + sigma = 1 (rectified flow: alpha = 1 - t, sigma = t), where
    x0 = x - sigma u and eps = x + alpha u.
    """
    if src == dst:
        return pred
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    if src == "eps":
        eps = pred
        x0 = (x - s * eps) / a
    elif src == "x0":
        x0 = pred
        eps = (x - a * x0) / s
    elif src == "v":
        eps = s * x + a * pred
        x0 = a * x - s * pred
    elif src == "flow_velocity":
        eps = x + a * pred
        x0 = x - s * pred
    else:
        raise ValueError(f"unknown prediction {src!r}; use one of {PREDICTIONS}")
    if dst == "eps":
        return eps
    if dst == "x0":
        return x0
    if dst == "v":
        return a * eps - s * x0
    if dst == "flow_velocity":
        return eps - x0
    raise ValueError(f"unknown prediction {dst!r}; use one of {PREDICTIONS}")


class Teacher(torch.nn.Module):
    """Base class. Subclasses set `schedule`, `prediction` and implement `forward(x, t)`.

    `forward` returns the raw prediction of kind `self.prediction`; t is a float64 [B] tensor.

    Optional capabilities, declared here with their defaults and overridden by the kinds that have them:
    `shape` ([C, H, W] of one sample, None when unknown), `network` (the denoiser a student may copy),
    `backbone_config` (its DSNO "backbone" build entry), `time_input_spec` (how that network takes time:
    "continuous" or {"discrete": N}), `exact` (closed form: solved and scored in float64, see
    `solve_dtype`) and `data_mean` (one sample's mean, for USF's afs=mean). An augmented teacher
    (PSLD: `dsno.teachers.psld_gmm`) has the same names, with states of `state_shape` whose first
    `data_channels` channels are the data, and a prior `prior_scale() * N(0, I)`.

    Conditions (`dsno.teachers.conditional`): `num_classes` (None: unconditional; else class
    labels in [0, num_classes), and `forward(x, t, labels=None)` takes labels [B] long with the
    null label num_classes), `supports_guidance` (it has that unconditional branch: it runs without
    labels and can be guided) and `guidance` (the scale w of (1 + w) f(x, t, y) - w f(x, t, null)).
    `conditioned(labels)` is the teacher with labels bound, as every solver calls it.
    """

    schedule: Schedule
    prediction: str
    shape: tuple[int, ...] | None = None
    backbone_config: dict[str, Any] | None = None
    time_input_spec: Any = "continuous"
    exact: bool = False
    augmented: bool = False
    num_classes: int | None = None
    supports_guidance: bool = False
    guidance: float = 0.0

    @property
    def network(self) -> torch.nn.Module | None:
        return None

    @property
    def data_mean(self) -> torch.Tensor | None:
        return None

    @property
    def state_shape(self) -> tuple[int, ...] | None:
        """The shape of one solver state: one sample's `shape` for a scalar process."""
        return self.shape

    @property
    def data_channels(self) -> int:
        """The leading channels of a state that are the data: all of them for a scalar process."""
        return int(self.shape[0])

    def prior_scale(self) -> torch.Tensor | None:
        """The prior's std per state channel (None: x_T ~ N(0, I) as the solvers take it)."""
        return None

    @property
    def grid_schedule(self) -> Schedule:
        """What time grids and loss weights are computed on (T, t_min, lam): the schedule."""
        return self.schedule

    @property
    def solve_dtype(self) -> torch.dtype:
        """The dtype solves of this teacher run in: float64 for an exact teacher, float32 for a network."""
        return torch.float64 if self.exact else torch.float32

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def conditioned(self, labels: Any, guidance: float | None = None) -> "Teacher":
        """This teacher with class labels [B] (long, in [0, num_classes)) bound and guidance scale w
        (None: `self.guidance`): a Teacher whose eps / x0 / v are the (guided) conditional ones.
        labels None: the unconditional teacher itself. One-line LabelError / GuidanceError on misfits."""
        return bind(self, labels, guidance)

    def predict(self, x: torch.Tensor, t: Any, kind: str) -> torch.Tensor:
        tb = batch_times(t, x)
        if kind != self.prediction:
            check_prediction(self.schedule, kind)
        check_times = getattr(self.schedule, "check_model_times", None)
        if check_times is not None:
            check_times(tb)
        raw = self(x, tb)
        if raw.shape != x.shape:
            raise ValueError(f"teacher returned shape {tuple(raw.shape)} for input {tuple(x.shape)}")
        raw = raw.to(x.dtype)
        if kind == self.prediction:
            return raw
        return convert(raw, x, self.schedule.alpha(tb), self.schedule.sigma(tb), self.prediction, kind)

    def eps(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return self.predict(x, t, "eps")

    def x0(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return self.predict(x, t, "x0")

    def v(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """VP's velocity alpha eps - sigma x0 (VP schedules only)."""
        return self.predict(x, t, "v")

    def flow_velocity(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """The flow-matching velocity u = dx/dt = eps - x0 (FlowSchedule only)."""
        return self.predict(x, t, "flow_velocity")

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this teacher in a data set's manifest (JSON-serialisable)."""
        return {"class": type(self).__name__, "prediction": self.prediction,
                "schedule": _schedule_summary(self.schedule)}


def _schedule_summary(s: VPSchedule) -> dict[str, Any]:
    d = s.to_dict()
    if s.kind == "discrete":
        betas = d.pop("betas")
        d["num_steps"] = len(betas)
        d["betas_sha256"] = hashlib.sha256(json.dumps(betas).encode()).hexdigest()[:16]
    return d


class TimeInputError(UserError):
    """A wrapped network takes another time convention than the one it would be called with."""


PROBE_TIMES = (0.1, 0.9)        # schedule times of the time-convention probe
PROBE_STEPS = 1000              # the usual DDPM step count, when the schedule does not say
RESPONSE_RATIO = 0.25           # the probed convention counts as wrong when it moves the output < 1/4 as much


class WrappedTeacher(Teacher):
    """Any callable fn(x, t_model) -> prediction (fn(x, t_model, labels) when num_classes is set: see `wrap`),
    with its schedule and parameterization.

    time_input: "continuous" passes schedule time t in [0, 1]; "discrete" passes the
    DDPM step index t * N - 1 (float) of a discrete schedule with N steps; or a callable
    mapping the float64 [B] time to whatever the model takes. None (not stated): continuous, after
    the first call checks that the network responds to t in [0, 1] (`check_time_input`).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], schedule: VPSchedule,
                 prediction: str = "eps", time_input: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
                 name: str | None = None, num_classes: int | None = None, supports_guidance: bool = False,
                 guidance: float = 0.0):
        super().__init__()
        check_prediction(schedule, prediction)
        check_class_count(num_classes, supports_guidance)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.supports_guidance = bool(supports_guidance)
        if time_input == "discrete" and schedule.kind != "discrete":
            raise ValueError("time_input='discrete' needs a discrete schedule (VPSchedule.discrete(betas))")
        if not (time_input is None or callable(time_input) or time_input in ("continuous", "discrete")):
            raise ValueError(f"time_input must be 'continuous', 'discrete' or a callable, got {time_input!r}")
        if isinstance(fn, torch.nn.Module):
            self.model = fn                      # a submodule: moves with .to(), once in state_dict
        else:
            self.model = None
            object.__setattr__(self, "_fn", fn)
        self.schedule = schedule
        self.prediction = prediction
        self.time_input_stated = time_input is not None
        self.time_input = "continuous" if time_input is None else time_input
        self.time_input_checked = callable(time_input) or getattr(schedule, "T", None) != 1.0
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.guidance = check_guidance(self, guidance)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        if callable(self.time_input):
            return self.time_input(t)
        if self.time_input == "discrete":
            return t * self.schedule.num_steps - 1.0
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.time_input_checked and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            self.time_input_checked = True
            self.check_time_input(x)
        tm = self.model_time(t)
        return self._call(x, tm, self.row_labels(labels, x))

    def row_labels(self, labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """The labels [B] long (null label num_classes) the network takes for the rows of x; None for an
        unconditional teacher, which refuses labels (LabelError)."""
        if self.num_classes is None:
            if labels is not None:
                check_labels(self, labels)          # refuses any labels of an unconditional teacher
            return None
        return row_labels(self, labels, x)

    def _call(self, x: torch.Tensor, tm: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        fn = self.model if self.model is not None else self._fn
        tm = tm.to(x.dtype if x.is_floating_point() else torch.float32)
        return fn(x, tm) if labels is None else fn(x, tm, labels)

    def probe_labels(self, x: torch.Tensor) -> torch.Tensor | None:
        """The labels of the time-convention probe: null (or class 0 without a null label); None unconditional."""
        if self.num_classes is None:
            return None
        fill = self.num_classes if self.supports_guidance else 0
        return torch.full((x.shape[0],), fill, dtype=torch.long, device=x.device)

    def time_response(self, x: torch.Tensor, convention: str) -> float | None:
        """How much the network's output on x moves between the schedule times PROBE_TIMES fed in
        `convention` ("continuous": t; "discrete": the step index t N - 1): |f(a) - f(b)| / (|f(a)| + |f(b)|),
        or None when the network cannot be called so (or returns non-finite values)."""
        n = getattr(self.schedule, "num_steps", None) or PROBE_STEPS
        outs = []
        for t in PROBE_TIMES:
            tm = torch.full((x.shape[0],), t * n - 1.0 if convention == "discrete" else t, dtype=torch.float64,
                            device=x.device)
            try:
                with torch.no_grad():
                    outs.append(self._call(x, tm, self.probe_labels(x)).double())
            except (ValueError, RuntimeError, IndexError, TypeError):   # a network that refuses such inputs
                return None
        scale = float(outs[0].norm() + outs[1].norm())
        change = float((outs[0] - outs[1]).norm())
        return change / scale if scale > 0 and torch.isfinite(torch.tensor(change / scale)) else None

    def check_time_input(self, x: torch.Tensor) -> None:
        """Probe the network on (up to 4 of) x at two times in both conventions; when it barely responds to
        the one it is called with but does to the other, refuse (the convention was not stated: TimeInputError)
        or warn (it was stated), in one line naming the fix."""
        mine = self.time_input
        other = "discrete" if mine == "continuous" else "continuous"
        probe = x[:4].detach()
        r_mine, r_other = self.time_response(probe, mine), self.time_response(probe, other)
        if r_mine is None or r_other is None or r_mine >= RESPONSE_RATIO * r_other:
            return
        ranges = {"continuous": "schedule time t in [0, 1]", "discrete": "DDPM step indices 0-999"}
        if other == "discrete":
            fix = ("pass time_input='discrete'" if getattr(self.schedule, "kind", None) == "discrete" else
                   "wrap it with its discrete schedule (dsno.VPSchedule.discrete(betas) or .ddpm_linear()) and "
                   "time_input='discrete', or time_input=a callable mapping t to its input")
        else:
            fix = "pass time_input='continuous'"
        msg = (f"the wrapped network {self.name!r} hardly responds to {ranges[mine]} (its output moves "
               f"{r_mine:.3g} between t={PROBE_TIMES[0]:g} and {PROBE_TIMES[1]:g}) but does to {ranges[other]} "
               f"({r_other:.3g}): {fix}")
        if not self.time_input_stated:
            raise TimeInputError(f"{msg}; or state time_input={mine!r} to keep it")
        warnings.warn(f"time_input={mine!r} looks wrong: {msg}", UserWarning, stacklevel=4)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp["name"] = self.name
        if self.num_classes is not None:        # an unconditional teacher's fingerprint stays as it was
            fp.update(num_classes=self.num_classes, supports_guidance=self.supports_guidance, guidance=self.guidance)
        return fp


def check_class_count(num_classes: Any, supports_guidance: Any) -> None:
    """num_classes None or an int >= 1; supports_guidance a bool, and False without classes (ValueError)."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be None (unconditional) or an int >= 1, got {num_classes!r}")
    if not isinstance(supports_guidance, bool):
        raise ValueError(f"supports_guidance must be True or False, got {supports_guidance!r}")
    if supports_guidance and num_classes is None:
        raise ValueError("supports_guidance=True needs num_classes: guidance mixes a class-conditional model with "
                         "its unconditional (null-label) branch")


def wrap(fn: Callable[..., torch.Tensor], schedule: VPSchedule,
         prediction: str = "eps", time_input: str | Callable | None = None, name: str | None = None,
         num_classes: int | None = None, supports_guidance: bool = False, guidance: float = 0.0) -> WrappedTeacher:
    """Turn any callable fn(x, t) predicting eps, x0, v (VP) or flow_velocity (flow) into a Teacher.

    time_input: how fn takes time: "continuous" (t in [0, 1]), "discrete" (a discrete schedule's step
    index t N - 1, as diffusers UNets take it) or a callable t -> fn's input. Not stated, the first call
    probes fn at two times and refuses, in one line, a network that responds to 0-999 but not to [0, 1].

    Class-conditional (num_classes K): fn(x, t, labels) with labels [B] long in [0, K], K the null label
    (always passed; a teacher without a null branch only ever gets [0, K)). supports_guidance: fn has that
    unconditional branch (trained with label dropout), so `bind` / `dsno.solve(..., cond=)` may guide it
    with scale w = guidance: (1 + w) fn(x, t, y) - w fn(x, t, K)."""
    return WrappedTeacher(fn, schedule, prediction, time_input, name, num_classes, supports_guidance, guidance)


class ConditionedTeacher(Teacher):
    """`teacher` with class labels [B] and guidance scale w bound: what the solvers call.

    forward(x, t) is teacher(x, t, labels) for w = 0, and otherwise (1 + w) f_y - w f_null from one
    call of the teacher on 2B rows (x and t repeated, labels then null labels). Everything else
    (schedule, prediction, shape, exact, network) is the teacher's."""

    def __init__(self, teacher: Teacher, labels: torch.Tensor, guidance: float):
        super().__init__()
        self.base = teacher
        self.labels = labels
        self.guidance = guidance
        self.num_classes = teacher.num_classes
        self.supports_guidance = teacher.supports_guidance
        self.schedule = teacher.schedule
        self.prediction = teacher.prediction
        self.shape = teacher.shape
        self.backbone_config = teacher.backbone_config
        self.time_input_spec = teacher.time_input_spec
        self.exact = teacher.exact
        self.name = teacher_name(teacher)

    @property
    def network(self) -> torch.nn.Module | None:
        return self.base.network

    @property
    def data_mean(self) -> torch.Tensor | None:
        return self.base.data_mean

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = row_labels(self.base, self.labels, x)
        if self.guidance == 0:
            return self.base(x, t, labels=labels)
        null = torch.full_like(labels, self.num_classes)
        both = self.base(torch.cat([x, x]), torch.cat([t, t]), labels=torch.cat([labels, null]))
        if both.shape[0] != 2 * x.shape[0]:
            raise ValueError(f"teacher returned {both.shape[0]} rows for the {2 * x.shape[0]} of a guided call")
        conditional, unconditional = both.chunk(2)
        w = self.guidance
        return (1.0 + w) * conditional - w * unconditional

    def fingerprint(self) -> dict[str, Any]:
        return {**self.base.fingerprint(), "guidance": self.guidance}


def bind(teacher: Any, labels: Any, guidance: Any = None) -> Any:
    """`teacher` as the solvers should call it for class labels `labels` ([B] long, or None) and
    guidance scale w (None: `teacher.guidance`, 0 when it has none).

    No labels: the teacher itself (its unconditional model), unchanged; LabelError when it is
    conditional without an unconditional branch, GuidanceError when w != 0 (guidance needs labels).
    Labels: a `ConditionedTeacher`; LabelError when they do not fit the teacher."""
    if isinstance(teacher, ConditionedTeacher):
        if labels is not None or guidance is not None:
            raise LabelError("this teacher already has labels bound (teacher.conditioned(...)): pass cond and "
                             "guidance to the unbound teacher")
        return teacher
    w = check_guidance(teacher, getattr(teacher, "guidance", 0.0) if guidance is None else guidance)
    if labels is None:
        require_unconditional(teacher)
        if w != 0:
            raise GuidanceError(f"guidance {w:g} needs class labels: pass cond=labels, or set guidance 0 for "
                                f"unconditional samples")
        return teacher
    return ConditionedTeacher(teacher, check_labels(teacher, labels), w)
