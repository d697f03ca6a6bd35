"""The DSNO regression loss over the M output times."""

from __future__ import annotations

from typing import Sequence

import torch

from dsno.schedules import VPSchedule
from dsno.training.perceptual import PerceptualDistance


def time_weights(schedule: VPSchedule, times: Sequence[float], w_min: float = 1.0, w_max: float = 1e4) -> torch.Tensor:
    """w_m = clamp(sqrt(SNR(t_m)), w_min, w_max) = clamp(exp(lam), ...): [M] float32. schedule: any object
    with lam(t), a teacher's grid_schedule (PSLD: its data part's half log-SNR)."""
    return torch.exp(schedule.lam(list(times))).clamp(w_min, w_max).to(torch.float32)


KINDS = ("l2", "l1", "lpips")


class TrajectoryLoss(torch.nn.Module):
    """sum_m w_m l(pred_m, target_m) / sum_m w_m, l = mean squared (l2) or mean absolute (l1) error,
    or the LPIPS-style VGG distance (lpips; `perceptual` is a `PerceptualDistance`).

    pred, target: [B, M, C, H, W]. Returns (loss: scalar, per_time: [M] unweighted).
    """

    def __init__(self, weights: torch.Tensor, kind: str = "l2", perceptual: torch.nn.Module | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"loss kind must be one of {KINDS}, got {kind!r}")
        if (kind == "lpips") != (perceptual is not None):
            raise ValueError("the lpips loss needs a perceptual distance, and only it takes one")
        self.kind = kind
        self._perceptual = [perceptual]     # frozen and not part of the state dict (so not of checkpoints)
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if self.kind == "lpips":
            b, m = pred.shape[:2]
            perceptual = self._perceptual[0].to(pred.device)
            dist = perceptual(pred.flatten(0, 1), target.flatten(0, 1)).reshape(b, m)
            per_time = dist.mean(dim=0)                                  # [M]
        else:
            diff = (pred.float() - target.float())
            err = diff.square() if self.kind == "l2" else diff.abs()
            per_time = err.flatten(2).mean(dim=(0, 2))                   # [M]
        w = self.weights.to(per_time.device)
        return (w * per_time).sum() / w.sum(), per_time.detach()


def build_loss(weights: torch.Tensor, kind: str = "l2", perceptual_weights: str | None = None) -> TrajectoryLoss:
    """The TrajectoryLoss of a run; lpips loads the VGG-16 weights from a local file (never downloads)."""
    perceptual = None
    if kind == "lpips":
        perceptual = PerceptualDistance(perceptual_weights)
    return TrajectoryLoss(weights, kind, perceptual)
