"""Exponential moving average of a model's weights, kept as a submodule so checkpoints carry it."""

from __future__ import annotations

import copy

import torch


class EMA(torch.nn.Module):
    """shadow <- d * shadow + (1 - d) * weights, d = min(decay, (1 + n) / (10 + n)) at update n."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1.0 + n) / (10.0 + n))
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
