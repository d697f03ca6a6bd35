"""Checks of the tensors users hand to the public API (`dsno.sample`, a loaded sampler).

    check_noise(x_T, shape=(1, 16, 16))     # a floating-point tensor [B, *shape], finite; else InputError
"""

from __future__ import annotations

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
