"""Validation on held-out trajectories during training, and the choice of the weights kept for export.

At every validation the EMA model is scored on the val split (trajectories whose noise it is never
trained on) and, with the same metrics, on a fixed subset of the training trajectories of the same
size, so the over-fitting gap shows beside the training loss (W&B / CSV, and checkpoints/validation.json).
The EMA weights of the validation with the lowest val/rmse_final are kept; train.select=best_val
exports them, train.select=last the EMA weights of the last step.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import lightning as L
import torch

from dsno.atomic import atomic_write_text
from dsno.errors import UserError
from dsno.loggers import log_image_grid
from dsno.training.ema import ema_model
from dsno.training.module import unpack

log = logging.getLogger("dsno")

SELECT = ("best_val", "last")          # train.select
SELECT_METRIC = "val/rmse_final"       # lower is better
SPLITS = ("val", "train_subset")       # the held-out trajectories, and training trajectories as many


@torch.no_grad()
def score(model: torch.nn.Module, loss: Callable, batches: Iterable, device: torch.device | str = "cpu",
          keep: int = 0) -> tuple[dict[str, float], torch.Tensor]:
    """({"loss", "rmse_final"}, the first `keep` final states predicted [keep, c, H, W]) of `model` over
    every batch ((x_T, states[, labels]) as training's; a model emitting c < C channels is scored on the
    states' first c). loss: the trajectory loss averaged over trajectories; rmse_final: the RMSE of
    the final state over every pixel of every trajectory (not a mean of per-batch RMSEs)."""
    total, items, sse, count = 0.0, 0, 0.0, 0
    samples = torch.empty(0)
    for batch in batches:
        x_T, states, labels = unpack([t.to(device) for t in batch])
        pred = model(x_T, labels)
        states = states[:, :, :pred.shape[2]]
        value, _ = loss(pred, states)
        total, items = total + float(value) * len(x_T), items + len(x_T)
        diff = pred[:, -1].double() - states[:, -1].double()
        sse, count = sse + float(diff.square().sum()), count + diff.numel()
        if len(samples) < keep:
            samples = torch.cat([samples, pred[:keep - len(samples), -1].float().cpu()])
    if not items:
        raise ValueError("no batch to score")
    return {"loss": total / items, "rmse_final": math.sqrt(sse / count)}, samples


class HeldOutValidation(L.Callback):
    """Validates the EMA model every `every` steps and at the last step (trainer.max_steps), on the
    data module's held-out loaders (`StepTrajectoryData.held_out_loaders`; none: no validation), logs
    val/{loss,rmse_final}, train_subset/{loss,rmse_final} and gap/rmse_final (val minus train_subset)
    at that step with an EMA sample grid (val/ema_samples), and rewrites `path` (rank 0, atomically).

    It runs in on_train_batch_end, after the EMA's update (give it after the `EMA` callback) and before
    ModelCheckpoint's save (Lightning orders checkpoint callbacks last), so the step-s checkpoint holds the step-s validation: its
    state (the rows, the best validation's step and EMA weights, the split's digest) resumes exactly.
    Every rank validates the whole held-out set (the loaders have no distributed sampler); rank 0 logs.
    """

    def __init__(self, every: int, select: str, path: Path | None, num_samples: int = 8):
        if select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {select!r}")
        self.every, self.select, self.path, self.num_samples = max(1, int(every)), select, path, num_samples
        self.rows: list[dict[str, float]] = []
        self.best_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.loaders: dict[str, Any] = {}
        self.split: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}
        self.resumed_from: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if not hasattr(data, "held_out_loaders"):       # fit without a StepTrajectoryData: nothing held out
            return
        self.loaders = data.held_out_loaders()
        self.sizes = {name: len(loader.dataset) for name, loader in self.loaders.items()}
        self.split = data.split_record()

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.loaders) and step > 0 and (step % self.every == 0 or step == max_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.due(trainer.global_step, trainer.max_steps):
            self.validate(trainer, pl_module)

    def validate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Score the EMA model on each held-out loader now; returns the logged row."""
        step, model = trainer.global_step, ema_model(trainer)
        was_training = model.training
        model.eval()
        try:
            with trainer.precision_plugin.val_step_context():
                scores = {name: score(model, pl_module.loss, loader, pl_module.device,
                                      self.num_samples if name == "val" else 0)
                          for name, loader in self.loaders.items()}
        finally:
            model.train(was_training)
        row: dict[str, float] = {f"{name}/{k}": v for name, (s, _) in scores.items() for k, v in s.items()}
        row["gap/rmse_final"] = row["val/rmse_final"] - row["train_subset/rmse_final"]
        self.rows.append({"step": step, **row})
        if self.best_step is None or row[SELECT_METRIC] < self.best_value():
            self.best_step = step
            self.best_weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(row, step=step)
            log_image_grid(trainer.logger, "val/ema_samples", scores["val"][1], step=step)
            log.info("validation at step %d: val rmse_final %.4g, train_subset %.4g (gap %+.3g)", step,
                     row["val/rmse_final"], row["train_subset/rmse_final"], row["gap/rmse_final"])
            self.write(self.provisional_step(step))
        return row

    def best_value(self) -> float:
        return next(r[SELECT_METRIC] for r in self.rows if r["step"] == self.best_step)

    def provisional_step(self, last_step: int) -> int:
        return self.best_step if self.select == "best_val" and self.best_step is not None else last_step

    def kept_weights(self, trainer: L.Trainer) -> dict[str, torch.Tensor]:
        """The EMA weights kept for export (keys of the bare DSNO model, on the CPU): the best
        validation's (select=best_val), else, or when no validation ran, the last step's. Rank 0
        records the kept step in `path`."""
        step = self.provisional_step(trainer.global_step)
        if self.select == "best_val" and self.best_step is None:
            log.warning("train.select=best_val, but no validation ran: keeping the EMA weights of the last step")
        if trainer.is_global_zero:
            self.write(step)
        if step == self.best_step and self.select == "best_val":
            return dict(self.best_weights)
        return {k: v.detach().cpu().contiguous() for k, v in ema_model(trainer).state_dict().items()}

    def write(self, selected_step: int) -> None:
        if self.path is None:
            return
        record = {"metric": SELECT_METRIC, "select": self.select, "selected_step": selected_step,
                  "best_step": self.best_step, "trajectories": self.sizes, "rows": self.rows}
        atomic_write_text(self.path, json.dumps(record, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "best_step": self.best_step, "best_weights": self.best_weights,
                "split": self.split}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.resumed_from = trainer.ckpt_path       # Lightning calls this hook before load_state_dict

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("split") and self.split and state["split"] != self.split:
            raise UserError(f"{self.resumed_from or 'the checkpoint'} was trained with another train/val split "
                            f"({describe(state['split'])}; now {describe(self.split)}: data.val_fraction, seed or the "
                            "data set changed): its held-out trajectories may have been trained on; use another "
                            "run_dir or train.resume=false to start over")
        self.rows = [dict(r) for r in state.get("rows", [])]
        self.best_step = state.get("best_step")
        self.best_weights = state.get("best_weights")


def describe(split: dict[str, Any]) -> str:
    return (f"{split.get('num_trajectories')} trajectories, {split.get('num_val')} held out, "
            f"val set sha256 {str(split.get('val_sha256'))[:12]}")
