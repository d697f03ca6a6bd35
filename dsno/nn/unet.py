"""A small ADM/EDM-style UNet: the DSNO backbone and the project's own teacher network.

`UNet(x, t)`: x [N, C, H, W], t [N] continuous time in [0, 1] -> [N, out_channels, H, W].
The time t * time_scale gets a sinusoidal embedding, an MLP, and modulates every ResBlock
through a FiLM scale/shift after its second GroupNorm. Every residual unit ("ResBlock followed
by its attention block, if any") is one `ResAttnBlock`, called as `unit(h, emb)`, so other code
(`dsno.nn.dsno.insert_temporal_layers`) can find and wrap the units by type.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of t [N] (any scale; the caller multiplies by time_scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias (ADM convention for the last layer of a residual branch)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, GroupNorm, FiLM(emb), SiLU-dropout-conv, plus a (1x1) skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0,
                 num_groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(num_groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(min(num_groups, out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised output."""

    def __init__(self, channels: int, num_heads: int = 1, num_groups: int = 8):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(min(num_groups, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [N, heads, HW, C/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class ResAttnBlock(nn.Module):
    """One residual unit: a ResBlock followed by its attention block (if `attention`)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, attention: bool,
                 dropout: float = 0.0, num_groups: int = 8, num_heads: int = 1):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_channels, dropout, num_groups)
        self.attn = AttnBlock(out_channels, num_heads, num_groups) if attention else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.res(h, emb)
        return self.attn(h) if self.attn is not None else h


class Downsample(nn.Module):
    """3x3 convolution with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ADM-style UNet for small images.

    Down path: per level, `num_res_blocks` units, then a Downsample (except at the last level).
    Middle: a unit with attention, then one without. Up path: per level, `num_res_blocks + 1`
    units fed with the concatenated skips, then an Upsample (except at the top level).
    Attention is used at every resolution listed in `attn_resolutions` (in pixels).
    num_classes: class-conditional (a label embedding of num_classes + 1 rows, the last the null
    label, added to the time embedding); None: unconditional.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                 attn_resolutions: Sequence[int] = (8,), image_size: int = 16, dropout: float = 0.0,
                 time_scale: float = 1000.0, num_groups: int = 8, num_heads: int = 1,
                 num_classes: int | None = None):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or num_res_blocks < 1:
            raise ValueError(f"need at least one level and one res block, got channel_mult={channel_mult}, "
                             f"num_res_blocks={num_res_blocks}")
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2**(levels-1) = {2 ** (levels - 1)}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.image_size = image_size
        self.time_scale = float(time_scale)
        self.base_channels = base_channels
        emb_channels = 4 * base_channels

        def unit(cin: int, cout: int, resolution: int) -> ResAttnBlock:
            return ResAttnBlock(cin, cout, emb_channels, resolution in attn_resolutions, dropout, num_groups,
                                num_heads)

        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_channels), nn.SiLU(),
                                      nn.Linear(emb_channels, emb_channels))
        self.num_classes = num_classes
        # class c's embedding is row c, the null label's (the unconditional branch) row num_classes
        self.label_emb = None if num_classes is None else nn.Embedding(num_classes + 1, emb_channels)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(unit(ch, base_channels * mult, res))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level != levels - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                res //= 2

        self.mid = nn.ModuleList([
            ResAttnBlock(ch, ch, emb_channels, True, dropout, num_groups, num_heads),
            ResAttnBlock(ch, ch, emb_channels, False, dropout, num_groups, num_heads),
        ])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(unit(ch + skip_channels.pop(), base_channels * mult, res))
                ch = base_channels * mult
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.norm_out = nn.GroupNorm(min(num_groups, ch), ch)
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] (or a scalar) in [0, 1], labels [B] long in [0, num_classes] (num_classes:
        the null label; None: every row null) for a class-conditional UNet -> [B, out_channels, H, W]."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t * self.time_scale, self.base_channels).to(x.dtype))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(labels).to(emb.dtype)
        elif labels is not None:
            raise ValueError("this UNet is unconditional (num_classes None) and takes no labels")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if _takes_emb(block) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def _takes_emb(block: nn.Module) -> bool:
    """True for residual units (possibly wrapped, e.g. with a temporal layer); False for resampling."""
    return not isinstance(block, (Downsample, Upsample))
