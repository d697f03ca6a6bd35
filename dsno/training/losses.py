"""The DSNO regression loss over the M output times."""

from __future__ import annotations

from typing import Sequence

import torch

from dsno.schedules import VPSchedule


def time_weights(schedule: VPSchedule, times: Sequence[float], w_min: float = 1.0, w_max: float = 1e4) -> torch.Tensor:
    """w_m = clamp(sqrt(SNR(t_m)), w_min, w_max) = clamp(alpha/sigma, ...): [M] float32."""
    return torch.exp(schedule.lam(list(times))).clamp(w_min, w_max).to(torch.float32)


class TrajectoryLoss(torch.nn.Module):
    """sum_m w_m l(pred_m, target_m) / sum_m w_m, l = mean squared (l2) or mean absolute (l1) error.

    pred, target: [B, M, ...]. Returns (loss: scalar, per_time: [M] unweighted).
    """

    def __init__(self, weights: torch.Tensor, kind: str = "l2"):
        super().__init__()
        if kind not in ("l2", "l1"):
            raise ValueError(f"loss kind must be 'l2' or 'l1', got {kind!r}")
        self.kind = kind
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        diff = (pred.float() - target.float())
        err = diff.square() if self.kind == "l2" else diff.abs()
        per_time = err.flatten(2).mean(dim=(0, 2))                       # [M]
        w = self.weights.to(per_time.device)
        return (w * per_time).sum() / w.sum(), per_time.detach()
