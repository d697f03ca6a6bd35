"""The temporal Fourier layer of DSNO: channel mixing in Fourier space along the M output times.

Features of the M branches of one image sit next to each other in the batch: h [B*M, C, H, W]
with branch m of image b at row b*M + m. For every pixel, the layer takes the rFFT over the M
axis, keeps the lowest `modes` frequencies, multiplies them by a complex (C, C, modes) weight
shared over pixels, takes the inverse rFFT and adds the result, through LeakyReLU(0.01), to the
input:  out = u + LeakyReLU(IRFFT_M(R * RFFT_M(u)[:modes])).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from neuralop.layers.spectral_convolution import SpectralConv
from torch import nn
from torch.nn import functional as F

NEGATIVE_SLOPE = 0.01


def _check_modes(num_times: int, modes: int) -> None:
    if num_times < 1:
        raise ValueError(f"num_times must be >= 1, got {num_times}")
    if not 1 <= modes <= num_times // 2 + 1:
        raise ValueError(f"modes must lie in [1, num_times // 2 + 1] = [1, {num_times // 2 + 1}] "
                         f"for num_times={num_times}, got {modes}")


def _to_time_major(h: torch.Tensor, num_times: int) -> torch.Tensor:
    """[B*M, C, H, W] -> [B*H*W, C, M] float32 (pixels into the batch, the M branches last)."""
    return rearrange(h, "(b m) c y x -> (b y x) c m", m=num_times).float()


def _from_time_major(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B*H*W, C, M] -> [B*M, C, H, W], H and W those of `like` ([B*M, C, H, W])."""
    return rearrange(y, "(b y x) c m -> (b m) c y x", y=like.shape[2], x=like.shape[3])


class TemporalConv(nn.Module):
    """Fourier layer over the M axis: [B*M, C, H, W] -> [B*M, C, H, W].

    The spectral part is neuraloperator's `SpectralConv` (1-D, dense complex (C, C, modes)
    weight, no bias), applied with the pixels folded into the batch. The weight starts at zero,
    so the layer starts as the identity; its gradient is then nonzero (LeakyReLU'(0) = 0.01).
    Computed in float32 even under autocast; the output has the input's dtype.
    `impl` ("fft" | "matmul", see `set_temporal_impl`) picks how the same weight is applied:
    through `SpectralConv` (the definition) or as the equivalent real [C, C, M, M] matrix built
    from it with gradient (no FFT; faster on the CPU). Both give the same output and gradient.

    Known gap (shared with the reference code): the FFT treats the M output times as equally
    spaced, although the DSNO time points usually are not (e.g. a quadratic grid). The layer
    is still a valid learned linear mixing of the branches; it is just not a Fourier
    transform of the trajectory in physical time.
    """

    def __init__(self, channels: int, num_times: int, modes: int):
        super().__init__()
        _check_modes(num_times, modes)
        self.channels, self.num_times, self.modes = channels, num_times, modes
        # SpectralConv keeps n_modes // 2 + 1 rFFT modes along the last axis: 2*modes-1 keeps `modes`.
        self.spectral = SpectralConv(channels, channels, n_modes=(2 * modes - 1,), bias=False)
        with torch.no_grad():
            self.spectral.weight.tensor.zero_()
        if list(self.spectral.weight.shape) != [channels, channels, modes]:
            raise RuntimeError(f"SpectralConv weight has shape {list(self.spectral.weight.shape)}, "
                               f"expected {[channels, channels, modes]}")
        self.impl = "fft"

    @property
    def weight(self) -> torch.Tensor:
        """The complex spectral weight R, [C_in, C_out, modes]."""
        return self.spectral.weight.tensor

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_times={self.num_times}, modes={self.modes}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            u = _to_time_major(h, self.num_times)
            if self.impl == "matmul":
                z = torch.einsum("oimn,bin->bom", self.real_kernel(differentiable=True), u)
            else:
                z = self.spectral(u)
            y = F.leaky_relu(z, NEGATIVE_SLOPE)
            return (h.float() + _from_time_major(y, h)).to(h.dtype)

    def real_kernel(self, differentiable: bool = False) -> torch.Tensor:
        """The spectral map as a real matrix K [C_out, C_in, M, M]: y[o, m] = sum K[o, i, m, n] u[i, n].

        Same conventions as `SpectralConv` (rFFT with norm="forward", irFFT of length M, which
        ignores the imaginary parts of the zero and Nyquist frequencies). Computed in float64 and
        detached by default (export); differentiable=True: float32, with gradient to the weight
        (the training path of impl="matmul").
        """
        m = self.num_times
        w = self.weight if differentiable else self.weight.detach().to(torch.complex128)   # [i, o, k]
        real = torch.float32 if differentiable else torch.float64
        k = torch.arange(self.modes, dtype=torch.float64, device=w.device)
        lag = torch.arange(m, dtype=torch.float64, device=w.device)
        lag = lag[:, None] - lag[None, :]                                        # [m, n]
        mult = torch.full((self.modes,), 2.0, dtype=torch.float64, device=w.device)
        mult[0] = 1.0
        if m % 2 == 0 and self.modes == m // 2 + 1:
            mult[-1] = 1.0                                                       # Nyquist term, once
        angle = 2.0 * math.pi * k[:, None, None] * lag[None] / m                 # [k, m, n]
        cos = (torch.cos(angle) * mult[:, None, None] / m).to(real)
        sin = (torch.sin(angle) * mult[:, None, None] / m).to(real)
        return (torch.einsum("iok,kmn->oimn", w.real.to(real), cos)
                - torch.einsum("iok,kmn->oimn", w.imag.to(real), sin))


class TemporalMatmul(nn.Module):
    """The same layer as a `TemporalConv`, with the spectral map as a real [C, C, M, M] matrix.

    No FFT and no complex tensors, so it exports to ONNX and torch.export; numerically the same
    as the TemporalConv it was made from (float rounding apart). Build with `from_temporal`.
    """

    def __init__(self, kernel: torch.Tensor):
        super().__init__()
        if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != kernel.shape[3]:
            raise ValueError(f"kernel must have shape [C, C, M, M], got {list(kernel.shape)}")
        self.num_times = kernel.shape[2]
        self.register_buffer("kernel", kernel.float())

    @classmethod
    def from_temporal(cls, layer: TemporalConv) -> "TemporalMatmul":
        return cls(layer.real_kernel())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            u = _to_time_major(h, self.num_times)
            y = F.leaky_relu(torch.einsum("oimn,bin->bom", self.kernel, u), NEGATIVE_SLOPE)
            return (h.float() + _from_time_major(y, h)).to(h.dtype)


TEMPORAL_IMPLS = ("fft", "matmul")


def set_temporal_impl(model: nn.Module, impl: str) -> int:
    """Set `impl` ("fft" | "matmul" | "auto") of every TemporalConv in `model`; returns how many.

    "auto" picks "matmul" on the CPU (measured faster there; benchmarks/dsno_temporal.py) and
    "fft" elsewhere. The state dict is the same whichever is used.
    """
    if impl == "auto":
        params = next(model.parameters(), None)
        impl = "matmul" if params is None or params.device.type == "cpu" else "fft"
    if impl not in TEMPORAL_IMPLS:
        raise ValueError(f"temporal impl must be one of {TEMPORAL_IMPLS} or 'auto', got {impl!r}")
    layers = [mod for mod in model.modules() if isinstance(mod, TemporalConv)]
    for layer in layers:
        layer.impl = impl
    return len(layers)
