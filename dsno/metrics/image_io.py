"""Convert image tensors between the model range (float in [-1, 1]) and 8-bit pixels (uint8 in [0, 255])."""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float images in data_range (default [-1, 1]) -> uint8 in [0, 255] (rounded half to even,
    out-of-range values clipped); uint8 passes through. The one float -> uint8 conversion of dsno.

    images: [..., C, H, W] float or uint8 -> same shape, uint8.
    """
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}")
    lo, hi = (float(v) for v in data_range)
    return ((images.float() - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1]. images: [..., C, H, W] -> same shape."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        raise TypeError(f"images must be a uint8 torch.Tensor, got {getattr(images, 'dtype', type(images).__name__)}")
    return images.float() / 127.5 - 1.0
