"""The LightningModule that trains a DSNO operator on teacher trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from dsno.errors import UserError
from dsno.nn.temporal import set_temporal_impl
from dsno.run_files import LAST_CHECKPOINT
from dsno.training.losses import TrajectoryLoss


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf."""


def unpack(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_T [B, C, H, W], states [B, M, C, H, W], labels [B] long or None) of a data set's batch: a
    conditional data set's batches carry the class labels third."""
    x_T, states, *rest = batch
    return x_T, states, rest[0] if rest else None


def non_finite_loss_message(loss: float, step: int, last_ckpt: Path | None) -> str:
    """What NonFiniteLossError says; it claims a kept checkpoint only if `last_ckpt` exists."""
    kept = (f"the last good checkpoint {last_ckpt} is kept (train.resume=true resumes from it)"
            if last_ckpt is not None and last_ckpt.is_file() else
            f"no checkpoint was written yet{f' ({last_ckpt} does not exist)' if last_ckpt else ''}")
    return (f"training loss is {loss} at step {step}; stopping: {kept}. Fix: lower train.lr or enable "
            f"train.grad_clip (trajectories are checked for NaN/inf unless data.verify=none)")


class DSNOModule(L.LightningModule):
    """Regression of the M trajectory states from x_T, with linear warm-up.

    Batches are (x_T: [B, C, H, W], states: [B, M, C, H, W]); a model emitting c < C channels (an
    augmented student: the data part of each state) is scored on the states' first c. The EMA of the
    weights is the `dsno.training.ema.EMA` callback's; `dsno.training.validation.HeldOutValidation` scores
    it on held-out trajectories. Resuming needs a checkpoint written with that callback (the EMA is
    part of an exact resume).
    temporal_impl: how the temporal layers run while fitting ("auto" | "fft" | "matmul", see
    `dsno.nn.set_temporal_impl`); the weights and checkpoints are the same for each.
    weight_decay: 0 trains with Adam; > 0 with AdamW's decoupled decay of every trained weight.
    A DSNO of M = 1 output time (plain distillation) has no time axis to mix: its temporal layers are
    frozen at their zero start, the identity, and only the backbone trains.
    """

    def __init__(self, model: torch.nn.Module, loss: TrajectoryLoss, lr: float = 2e-4,
                 warmup_steps: int = 100, temporal_impl: str = "auto", weight_decay: float = 0.0):
        super().__init__()
        self.model = model
        self.loss = loss
        self.lr, self.warmup_steps, self.weight_decay = lr, warmup_steps, weight_decay
        self.temporal_impl = temporal_impl
        if getattr(model, "num_times", None) == 1:
            for p in model.temporal_parameters():
                p.requires_grad_(False)

    def on_fit_start(self) -> None:
        set_temporal_impl(self.model, self.temporal_impl)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "averaging_state" not in checkpoint:    # before Lightning loads a state dict of another layout
            raise UserError(f"{self.trainer.ckpt_path} holds no EMA of this dsno's checkpoint layout (written before "
                            "the EMA became Lightning's callback, or by another program); use another run_dir or "
                            "train.resume=false to start over")

    def forward(self, x_T: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x_T, labels)

    def training_step(self, batch, batch_idx):
        x_T, states, labels = unpack(batch)
        pred = self.model(x_T, labels)
        loss, per_time = self.loss(pred, states[:, :, :pred.shape[2]])
        if not torch.isfinite(loss):
            ckpt = getattr(self._trainer, "checkpoint_callback", None)
            last = Path(ckpt.dirpath) / LAST_CHECKPOINT if getattr(ckpt, "dirpath", None) else None
            raise NonFiniteLossError(non_finite_loss_message(loss.item(), self.global_step, last))
        self.log("train/loss", loss, prog_bar=True)
        for m, v in enumerate(per_time):
            self.log(f"train/err_t{m}", v)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = (torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay) if self.weight_decay > 0
               else torch.optim.Adam(params, lr=self.lr))
        warm = max(1, self.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
