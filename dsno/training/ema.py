"""The EMA of a model's weights: one decay rule, on torch's AveragedModel, as a Lightning callback
(`EMA`) for the training stage and as a bare AveragedModel (`averaged_model`) for plain loops."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn: shadow <- d * shadow + (1 - d) * weights with
    d = min(decay, (1 + n) / (10 + n)) at update n >= 1 (update 0 copies the weights).

    The warm-up matters for short runs: with a fixed d = 0.999 the weights of the first step
    would still weigh exp(-0.6) = 55 % after 600 steps (the CPU recipes' length)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")

    @torch.no_grad()
    def update(shadow: list[torch.Tensor], weights: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if shadow[0].is_floating_point():
            torch._foreach_lerp_(shadow, weights, 1.0 - d)
        else:
            for s, w in zip(shadow, weights):
                s.copy_(w)
    return update


def averaged_model(model: torch.nn.Module, decay: float = 0.999) -> AveragedModel:
    """An EMA of `model` for a plain training loop: call .update_parameters(model) after each
    optimizer step; .module is the averaged network. Buffers are copied, not averaged."""
    return AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=False)


class EMA(WeightAveraging):
    """Lightning's weight-averaging callback with `ema_update`'s rule, updated after every optimizer
    step. Validation runs on the EMA weights (Lightning swaps them in), checkpoints hold them under
    "state_dict" (the live weights under "current_model_state"), and after fit the module holds them.

    The average lives on the training device (Lightning's default would leave it where the module
    was at setup, the CPU, and copy every weight there at every step). Its updates happen in
    on_train_batch_end, before ModelCheckpoint's (Lightning orders checkpoint callbacks last), so a
    checkpoint written at step s holds EMA update s and a resume repeats none and skips none.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__(use_buffers=False, multi_avg_fn=ema_update(decay))
        self.decay = decay

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)

    def averaged(self) -> torch.nn.Module:
        """The averaged copy of the LightningModule (same attribute names)."""
        if self._average_model is None:
            raise RuntimeError("the EMA callback has no average before trainer.fit sets it up")
        return self._average_model.module


def ema_model(trainer: L.Trainer) -> torch.nn.Module:
    """The EMA copy of the trained model (the LightningModule's `model`) of `trainer`'s `EMA` callback."""
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
    if ema is None:
        raise RuntimeError("the trainer has no dsno.training.ema.EMA callback")
    return ema.averaged().model
