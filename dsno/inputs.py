"""Checks of the tensors users hand to the public API (`dsno.solve`, a loaded sampler).

    check_noise(x_T, shape=(1, 16, 16))     # a floating-point tensor [B, *shape], finite; else InputError
    check_class_labels(labels, 10, batch=B)  # a LongTensor [B] in [0, 10) (None for num_classes None)
    sample_labels(3, 10, n=5)                # an int: every sample that class -> tensor([3, 3, 3, 3, 3])
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

from dsno.errors import UserError


class InputError(UserError):
    """An argument of a public function (x_T, n, device) is wrong; the message says how to fix it."""


def check_noise(x_T: Any, shape: Sequence[int] | None = None, name: str = "x_T") -> torch.Tensor:
    """x_T when it is a floating tensor [B, *shape] (any B >= 1; shape None: any) of finite values;
    else one InputError naming it and the shape expected."""
    want = f"[B, {', '.join(map(str, shape))}]" if shape is not None else "[B, ...]"
    if (not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.ndim < 1
            or (shape is not None and tuple(x_T.shape[1:]) != tuple(shape))):
        got = f"{tuple(x_T.shape)} {x_T.dtype}" if isinstance(x_T, torch.Tensor) else type(x_T).__name__
        raise InputError(f"{name} must be a floating-point tensor of shape {want}, got {got}")
    bad = int((~torch.isfinite(x_T)).sum())
    if bad:
        raise InputError(f"{name} holds {bad} non-finite values (NaN or infinity); pass finite noise, e.g. "
                         f"torch.randn(B, {want[4:-1] if shape is not None else '...'})")
    return x_T


def check_class_labels(labels: Any, num_classes: int | None, batch: int | None = None, name: str = "labels",
                       owner: str = "this sampler", error: type[UserError] = InputError) -> torch.Tensor | None:
    """labels as a LongTensor [B] in [0, num_classes) (B = batch when given; B >= 1 unless batch is 0), or
    None when num_classes is None (unconditional: labels must be None); else one `error` naming `name`
    and `owner`. The one check of class labels: samplers, `dsno.solve(cond=)` and the CLIs use it."""
    if num_classes is None:
        if labels is not None:
            raise error(f"{owner} is unconditional and takes no class labels: drop {name}")
        return None
    want = f"class labels as a LongTensor [B] in [0, {num_classes})"
    if labels is None:
        raise error(f"{owner} is class-conditional ({num_classes} classes): pass {name}, {want}, one per sample")
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise error(f"{name} must be {want}, got {type(labels).__name__}") from None
    if labels.numel() and (labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex()):
        raise error(f"{name} must be {want}, got dtype {labels.dtype}")
    rows = batch if batch is not None else max(1, labels.shape[0]) if labels.ndim == 1 else 1   # any B >= 1
    if labels.ndim != 1 or labels.shape[0] != rows:
        rows = f"{batch} labels (one per sample)" if batch is not None else "one label per sample"
        raise error(f"{name} must be {want} with {rows}, got shape {tuple(labels.shape)}")
    if labels.numel() == 0:
        return labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise error(f"{name} holds label {low if low < 0 else high}, outside [0, {num_classes}) of {owner} "
                    f"({num_classes} classes)")
    return labels.long()


def sample_labels(labels: Any, num_classes: int | None, n: int, name: str = "labels",
                  owner: str = "this sampler") -> torch.Tensor | None:
    """The class labels of n samples, LongTensor [n] (None for an unconditional owner): `labels` an int
    (every sample that class) or n labels (a sequence or tensor); else one InputError (`check_class_labels`)."""
    one = (isinstance(labels, numbers.Integral) and not isinstance(labels, bool)) or \
        (isinstance(labels, torch.Tensor) and labels.ndim == 0)
    if one and num_classes is not None:
        label = check_class_labels(torch.as_tensor(labels).reshape(1), num_classes, 1, name, owner)
        return label.expand(n).clone()
    return check_class_labels(labels, num_classes, batch=n, name=name, owner=owner)
