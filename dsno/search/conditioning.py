"""The labels and guidance of a search on a class-conditional teacher.

Each noise batch of the search (the scoring batch and the verification batch) gets class labels drawn
by the data stage's rule (`dsno.data.generate.trajectory_labels`) from that batch's noise seed: label
g of a batch of noise seed n is trajectory g's label of a data set of seed n. The reference solve and
every candidate of a batch run on the teacher bound once to those labels with guidance scale w
(`dsno.teachers.conditional.bind`), so every score compares the same guided ODE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dsno.data.generate import label_rule, trajectory_labels
from dsno.data.manifest import LABELS
from dsno.search.records import SearchError
from dsno.teachers.conditional import bind, check_guidance, teacher_class_weights


@dataclass(frozen=True)
class Conditioning:
    """class_weights: the weight of each class label (one per class of the teacher); guidance: the scale
    w of (1 + w) f(x, t, y) - w f(x, t, null) (0: the conditional model)."""

    class_weights: tuple[float, ...]
    guidance: float

    @classmethod
    def of(cls, teacher: Any, class_weights: Sequence[float] | None = None) -> "Conditioning | None":
        """The conditioning of `teacher`'s search: None for an unconditional teacher (num_classes None);
        else labels drawn with `class_weights` (None: the teacher's own `class_weights`, else uniform) and
        the teacher's guidance scale `teacher.guidance` (0 when it has none). SearchError (one line) when the
        weights do not fit the teacher, GuidanceError when its guidance is not usable."""
        num_classes = getattr(teacher, "num_classes", None)
        name = getattr(teacher, "name", None) or type(teacher).__name__
        if num_classes is None:
            if class_weights is not None:
                raise SearchError(f"class weights {list(class_weights)} are for a class-conditional teacher; teacher "
                                  f"{name} is unconditional: drop them")
            return None
        if class_weights is None:
            class_weights = teacher_class_weights(teacher)
        try:
            weights = tuple(float(w) for w in class_weights)
            label_rule(weights)
        except (TypeError, ValueError):
            raise SearchError(f"class weights {list(class_weights)}: must be finite numbers >= 0, one per class "
                              f"of teacher {name} ({num_classes} classes), not all 0") from None
        if len(weights) != num_classes:
            raise SearchError(f"class weights {list(weights)}: need one weight per class of teacher {name} "
                              f"({num_classes} classes)")
        return cls(weights, check_guidance(teacher, getattr(teacher, "guidance", 0.0)))

    def fingerprint(self) -> dict[str, Any]:
        """The search fingerprint's entries of the conditioning: the label rule with its normalised
        weights (the data set's `labels` entry) and the guidance scale."""
        return {LABELS: label_rule(self.class_weights), "guidance": self.guidance}

    def describe(self) -> dict[str, Any]:
        """The record of a searched solver schedule's `info.search`: the guidance scale and the normalised weights."""
        return {"guidance": self.guidance, "class_weights": label_rule(self.class_weights)["class_weights"]}

    def labels(self, seed: int, size: int) -> torch.Tensor:
        """The labels [size] long of the batch of noise seed `seed`."""
        return torch.from_numpy(trajectory_labels(seed, 0, size, self.class_weights))

    def bind(self, teacher: Any, labels: torch.Tensor) -> Any:
        """`teacher` with `labels` [B] and the guidance bound: what the batch's solves call."""
        return bind(teacher, labels, self.guidance)
