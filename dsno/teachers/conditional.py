"""Conditions of a teacher: class labels, the null label and classifier-free guidance.

A class-conditional teacher declares `num_classes` (labels in [0, num_classes)) and implements
`forward(x, t, labels=None)` with labels [B] long in [0, num_classes], where the value
`num_classes` is the null label (the unconditional branch; None: every row null).
`supports_guidance` says it has that branch, so it runs without labels and can be guided.

Guidance (Ho & Salimans 2022) with scale w >= 0, the convention of `teacher.guidance`:

    guided(x, t, y) = (1 + w) f(x, t, y) - w f(x, t, null)

w = 0 is the conditional model; other code writes s = 1 + w (f_null + s (f_y - f_null)). f is
the teacher's raw prediction (eps, x0, v or flow_velocity): the rule is the same in each, since
they are affine in one another at the same x. Both branches run as one network call of 2B rows.

Solvers never see a condition: `bind` returns a `ConditionedTeacher`, a Teacher view with the
labels and w fixed, which every solver calls as `eps(x, t)` / `x0(x, t)`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from dsno.errors import UserError
from dsno.inputs import check_class_labels
from dsno.teachers.base import Teacher


class LabelError(UserError):
    """Class labels that do not fit the teacher: given to an unconditional one, missing, of the
    wrong shape or dtype, or out of range."""


class GuidanceError(UserError):
    """A guidance scale that is negative or not finite, or set on a teacher without an unconditional branch."""


def _name(teacher: Any) -> str:
    return getattr(teacher, "name", None) or type(teacher).__name__


def check_guidance(teacher: Any, guidance: Any) -> float:
    """The guidance scale w as a float; GuidanceError when it is not a finite number >= 0, or not 0
    on a teacher without an unconditional branch (`supports_guidance`)."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) \
            or guidance < 0:
        raise GuidanceError(f"guidance must be a finite number >= 0 (w of (1 + w) f(x, t, y) - w f(x, t, null); "
                            f"0: the conditional model), got {guidance!r}")
    if guidance != 0 and not getattr(teacher, "supports_guidance", False):
        raise GuidanceError(f"teacher {_name(teacher)} has no unconditional (null-label) branch, so it cannot be "
                            f"guided: set guidance to 0, got {guidance!r}")
    return float(guidance)


def check_labels(teacher: Any, labels: Any) -> torch.Tensor | None:
    """The user's class labels (`cond`) for `teacher` as a LongTensor [B] in [0, num_classes) (None only for
    no labels on an unconditional teacher); LabelError otherwise (`dsno.inputs.check_class_labels`)."""
    return check_class_labels(labels, getattr(teacher, "num_classes", None), name="cond",
                              owner=f"teacher {_name(teacher)}", error=LabelError)


def require_unconditional(teacher: Any) -> None:
    """LabelError when `teacher` is class-conditional without an unconditional branch (it needs labels)."""
    num_classes = getattr(teacher, "num_classes", None)
    if num_classes is not None and not getattr(teacher, "supports_guidance", False):
        raise LabelError(f"teacher {_name(teacher)} is class-conditional ({num_classes} classes) without an "
                         f"unconditional branch: pass cond=labels (a LongTensor [B] in [0, {num_classes}))")


def teacher_class_weights(teacher: Any) -> list[float]:
    """A conditional teacher's own label weights (`class_weights`, e.g. a mixture's P(y)), else uniform;
    [] for an unconditional teacher."""
    num_classes = getattr(teacher, "num_classes", None)
    if num_classes is None:
        return []
    own = getattr(teacher, "class_weights", None)
    return [1.0] * num_classes if own is None else [float(w) for w in own]


def row_labels(teacher: Any, labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The labels a conditional teacher's `forward` uses for the rows of x: [B] long on x's device,
    in [0, num_classes] (num_classes: the null label). None: every row null, or LabelError when the
    teacher has no unconditional branch."""
    if labels is None:
        require_unconditional(teacher)
        return torch.full((x.shape[0],), teacher.num_classes, dtype=torch.long, device=x.device)
    if labels.shape != (x.shape[0],):
        raise LabelError(f"cond has shape {tuple(labels.shape)} for a batch of {x.shape[0]} samples: give one "
                         f"label per row of x_T")
    return labels.to(device=x.device, dtype=torch.long)


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
        self.name = _name(teacher)

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
