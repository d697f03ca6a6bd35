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
labels and w fixed, which every solver calls as `eps(x, t)` / `x0(x, t)`. They live beside `Teacher`
(dsno.teachers.base), the checks in dsno.teachers.labels; this module is their public place.
"""

from __future__ import annotations

from dsno.teachers.base import ConditionedTeacher, bind  # noqa: F401  (a Teacher view: it lives beside Teacher)
from dsno.teachers.labels import (GuidanceError, LabelError, check_guidance, check_labels,  # noqa: F401
                                  require_unconditional, row_labels, teacher_class_weights)
