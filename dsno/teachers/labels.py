"""Checks of a teacher's conditions: class labels, the null label and the guidance scale (no torch
module here; `dsno.teachers.conditional` documents the conventions and binds them).

    check_labels(teacher, labels)      # LongTensor [B] in [0, num_classes); else LabelError
    check_guidance(teacher, w)         # a finite w >= 0, 0 without an unconditional branch; else GuidanceError
    row_labels(teacher, labels, x)     # the labels a conditional forward uses, null rows for None
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from dsno.errors import UserError
from dsno.inputs import check_class_labels


class LabelError(UserError):
    """Class labels that do not fit the teacher: given to an unconditional one, missing, of the
    wrong shape or dtype, or out of range."""


class GuidanceError(UserError):
    """A guidance scale that is negative or not finite, or set on a teacher without an unconditional branch."""


def teacher_name(teacher: Any) -> str:
    return getattr(teacher, "name", None) or type(teacher).__name__


def check_guidance(teacher: Any, guidance: Any) -> float:
    """The guidance scale w as a float; GuidanceError when it is not a finite number >= 0, or not 0
    on a teacher without an unconditional branch (`supports_guidance`)."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) \
            or guidance < 0:
        raise GuidanceError(f"guidance must be a finite number >= 0 (w of (1 + w) f(x, t, y) - w f(x, t, null); "
                            f"0: the conditional model), got {guidance!r}")
    if guidance != 0 and not getattr(teacher, "supports_guidance", False):
        raise GuidanceError(f"teacher {teacher_name(teacher)} has no unconditional (null-label) branch, so it "
                            f"cannot be guided: set guidance to 0, got {guidance!r}")
    return float(guidance)


def check_labels(teacher: Any, labels: Any) -> torch.Tensor | None:
    """The user's class labels (`cond`) for `teacher` as a LongTensor [B] in [0, num_classes) (None only for
    no labels on an unconditional teacher); LabelError otherwise (`dsno.inputs.check_class_labels`)."""
    return check_class_labels(labels, getattr(teacher, "num_classes", None), name="cond",
                              owner=f"teacher {teacher_name(teacher)}", error=LabelError)


def require_unconditional(teacher: Any) -> None:
    """LabelError when `teacher` is class-conditional without an unconditional branch (it needs labels)."""
    num_classes = getattr(teacher, "num_classes", None)
    if num_classes is not None and not getattr(teacher, "supports_guidance", False):
        raise LabelError(f"teacher {teacher_name(teacher)} is class-conditional ({num_classes} classes) without an "
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
