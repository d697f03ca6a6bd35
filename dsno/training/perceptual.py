"""LPIPS-style perceptual distance on VGG-16 features, the loss the reference CIFAR recipe trains with.

d(x, y) = sum_l mean_hw || n(f_l(x)) - n(f_l(y)) ||^2 over the channel axis, with f_l the VGG-16
activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 and n() the unit-length normalisation over
channels (LPIPS with uniform layer weights: its learned linear heads are not used). Images are in
the data range [-1, 1], [N, C, H, W] with C = 1 or 3 (1 is repeated to 3), and are shifted and
scaled by LPIPS' ImageNet constants; images smaller than 32 pixels are upsampled to 32 so the
deepest layer keeps at least 2 x 2 pixels.

The weights come from a local file, never from the network: torchvision's VGG-16 state dict
(`vgg16-397923af.pth`, in torch's hub cache by default) or any file with the same
`features.N.weight` / `features.N.bias` keys (.pth loaded with weights_only=True, or
.safetensors). The convolution widths are read from the file, so a small random file of the
same layout works for tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from dsno.hub_weights import hub_weights_path

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# torchvision's vgg16().features: conv indices, the pools after them, and the LPIPS taps (relu outputs)
_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_POOL_AFTER = (2, 7, 14, 21)
_TAPS = (2, 7, 14, 21, 28)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 32


def vgg_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The local VGG-16 weights: `path`, else torch's hub cache. Raises UserFileNotFoundError (one line)."""
    return hub_weights_path(path, VGG16_FILE, (
        "VGG-16 weights for the perceptual loss not found at {path}: nothing is downloaded at run time; "
        f"fetch {VGG16_URL} on a machine with network and put it at {{default}}, or pass "
        "train.perceptual_weights=FILE"))


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class VGGFeatures(nn.Module):
    """VGG-16's convolutional stack up to relu5_3, frozen: x [N, 3, H, W] -> the 5 LPIPS taps."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        missing = [f"features.{i}.{p}" for i in _CONVS for p in ("weight", "bias") if f"features.{i}.{p}" not in state]
        if missing:
            raise ValueError(f"VGG-16 weights lack {missing[0]} (and {len(missing) - 1} more): expected "
                             "torchvision's vgg16 state dict keys features.N.weight / features.N.bias")
        self.convs = nn.ModuleList()
        for i in _CONVS:
            w, b = state[f"features.{i}.weight"], state[f"features.{i}.bias"]
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            self.convs.append(conv)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, conv in zip(_CONVS, self.convs):
            x = F.relu(conv(x))
            if i in _TAPS:
                taps.append(x)
            if i in _POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return taps


class PerceptualDistance(nn.Module):
    """LPIPS-style distance: (x, y) [N, C, H, W] in [-1, 1] -> [N] float32 (0 iff the features agree)."""

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        self.features = VGGFeatures(_load_state(vgg_weights_path(weights)))
        self.register_buffer("shift", torch.tensor(_SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).reshape(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "PerceptualDistance":
        super().train(mode)
        self.features.eval()               # frozen: always in eval mode
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"perceptual distance needs 1- or 3-channel images, got {x.shape[1]} channels")
        if min(x.shape[-2:]) < MIN_SIZE:
            x = F.interpolate(x, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
        return (x - self.shift) / self.scale

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"images {tuple(x.shape)} and {tuple(y.shape)} differ in shape")
        with torch.autocast(device_type=x.device.type, enabled=False):
            fx = self.features(self._prepare(x))
            fy = self.features(self._prepare(y))
            dist = torch.zeros(x.shape[0], device=x.device)
            for a, b in zip(fx, fy):
                a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
                b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
                dist = dist + (a - b).square().sum(1).mean(dim=(1, 2))
        return dist
