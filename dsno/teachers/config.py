"""The configuration every teacher kind shares: its noise schedule (`ScheduleConfig`) and the base
`TeacherConfig` that a kind's own dataclass extends (`dsno.teachers.registry.register_teacher`).

The run config (`dsno.config`) composes these; the teacher modules import them from here, so the
library never imports the run config.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
import math
from typing import Any, ClassVar, Optional

from omegaconf import MISSING

from dsno.checks import choice, count, fail, in_range
from dsno.schedules import VPSchedule
from dsno.schema import doc_field
from dsno.teachers.base import PREDICTIONS


class ScheduleKind(StrEnum):
    linear = "linear"               # VPSchedule.linear(beta_min, beta_max)
    cosine = "cosine"               # VPSchedule.cosine(s)
    ddpm_linear = "ddpm_linear"     # VPSchedule.ddpm_linear(num_steps, beta_start, beta_end): discrete



@dataclass
class ScheduleConfig:
    """A VP noise schedule; only the keys of its `kind` are read (the others are refused)."""

    kind: ScheduleKind = doc_field(ScheduleKind.linear, "the noise schedule: linear (VP-SDE), cosine or ddpm_linear "
                                   "(discrete DDPM betas)")
    beta_min: float = doc_field(0.1, "kind=linear: beta(t) at t = 0")
    beta_max: float = doc_field(20.0, "kind=linear: beta(t) at t = 1")
    s: float = doc_field(0.008, "kind=cosine: the offset s of alpha_bar = cos((t + s) / (1 + s) pi / 2)^2")
    num_steps: int = doc_field(1000, "kind=ddpm_linear: the number N of discrete steps")
    beta_start: float = doc_field(1e-4, "kind=ddpm_linear: the first step's beta")
    beta_end: float = doc_field(0.02, "kind=ddpm_linear: the last step's beta")

    KEYS: ClassVar[dict] = {"linear": ("beta_min", "beta_max"), "cosine": ("s",),
                            "ddpm_linear": ("num_steps", "beta_start", "beta_end")}

    def check(self, at: str) -> None:
        unread = [k for ks in (v for kind, v in self.KEYS.items() if kind != self.kind) for k in ks
                  if getattr(self, k) != ScheduleConfig.__dataclass_fields__[k].default]
        if unread:
            owner = next(kind for kind, ks in self.KEYS.items() if unread[0] in ks)
            fail(f"{at}.{unread[0]}", getattr(self, unread[0]), f"is read by {at}.kind={owner} only, and this "
                  f"schedule is kind={self.kind}; remove it or set {at}.kind={owner}")
        if self.kind == "linear":
            in_range(f"{at}.beta_min", self.beta_min, 0.0, 1e4, lo_open=True)
            in_range(f"{at}.beta_max", self.beta_max, 0.0, 1e4, lo_open=True)
            if not self.beta_min < self.beta_max:
                fail(f"{at}.beta_max", self.beta_max, f"must exceed {at}.beta_min ({self.beta_min})")
        elif self.kind == "cosine":
            in_range(f"{at}.s", self.s, 0.0, 1.0, lo_open=True, hi_open=True)
        else:
            count(f"{at}.num_steps", self.num_steps, 100_000, "a DDPM schedule of more steps is continuous "
                   "in all but name; use kind=linear")
            in_range(f"{at}.beta_start", self.beta_start, 0.0, 1.0, lo_open=True, hi_open=True)
            in_range(f"{at}.beta_end", self.beta_end, 0.0, 1.0, lo_open=True, hi_open=True)
            if not self.beta_start < self.beta_end:
                fail(f"{at}.beta_end", self.beta_end, f"must exceed {at}.beta_start ({self.beta_start})")


def build_schedule(sc: ScheduleConfig):
    """The VPSchedule a ScheduleConfig describes."""
    if sc.kind == "linear":
        return VPSchedule.linear(sc.beta_min, sc.beta_max)
    if sc.kind == "cosine":
        return VPSchedule.cosine(sc.s)
    return VPSchedule.ddpm_linear(sc.num_steps, sc.beta_start, sc.beta_end)


@dataclass
class TeacherConfig:
    """The keys every teacher kind has. A kind's own dataclass (in its module, registered with
    `dsno.teachers.registry.register_teacher`) adds the keys that change what it loads and
    range-checks them in `__post_init__`. `fixed_schedule()` is the noise schedule the config fixes
    before loading, or None when the weights alone decide it (data.times is then checked at load)."""

    kind: str = doc_field(MISSING, "the teacher kind (teacher=KIND picks it and its keys)")
    process: ClassVar[str] = "scalar"     # the solver registry's process the kind's teacher needs
    conditional: ClassVar[bool] = False   # its teacher takes class labels (num_classes is not None)

    def fixed_schedule(self):
        return None


def check_prediction_key(at: str, value: Optional[str]) -> None:
    """teacher.prediction, when given, is one of the predictions a Teacher knows."""
    if value is not None:
        choice(f"{at}.prediction", value, PREDICTIONS)


def check_guidance_key(value: Any) -> None:
    """teacher.guidance: a finite number >= 0 (ConfigError, one line)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        fail("teacher.guidance", value, "must be a finite number >= 0 (w of (1 + w) f(x, t, y) - w f(x, t, null); "
              "0: the conditional model)")
