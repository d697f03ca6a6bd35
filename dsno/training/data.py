"""The training stage's data module: dsno.data's deterministic train/val split, with a train
loader whose batches are a pure function of (seed, global step, rank), so a resumed run sees
exactly the batches an uninterrupted one would (see StepBatchOrder). Each batch's shards are
verified (sha256, finite values) in the main process before the batch is loaded (VerifyFirst).

The val split is held out: trajectory g's noise depends on (data seed, g) only, the batch order
draws from the train indices only, so no val trajectory's noise is ever trained on. Validation is
`dsno.training.validation.HeldOutValidation`'s (on `held_out_loaders`), not Lightning's val loop.

With `fresh` (train.fresh_per_step = f > 0), the train loader yields batch_size - f stored trajectories a
step (the same StepBatchOrder over the train split, of that smaller batch; with f = batch_size the train
split is not read, each step's stored part is empty) and `on_after_batch_transfer` appends the step's f fresh
teacher trajectories, solved on the training device (`dsno.training.fresh`): they are numbered past the
stored set (`dsno.data.stream`), so they are never val trajectories either."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from dsno.data import TrajectoryDataModule
from dsno.data.dataset import VerifyFirst
from dsno.data.manifest import LABELS
from dsno.data.stream import FreshStream
from dsno.training.batch_order import StepBatchOrder
from dsno.training.fresh import FreshTrajectories, Solve


class StepTrajectoryData(TrajectoryDataModule):
    """batch_size: trajectories a training step, stored and fresh together. fresh_per_step (0 to
    batch_size) of them are fresh (`fresh`: the `FreshTrajectories` continuing this data set, None
    when 0), solved by fresh_solve(device) -> solve(x_T, labels=None) -> states, the teacher stage's
    solve built on the training device (`dsno.stages.trajectories.teacher_solve`)."""

    # Lightning's own val loop does not run: HeldOutValidation validates inside the training step, so
    # the step-s checkpoint holds the step-s validation (an exact resume)
    val_dataloader = L.LightningDataModule.val_dataloader

    def __init__(self, *args, fresh_per_step: int = 0, fresh_solve: Callable[[torch.device], Solve] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(fresh_per_step, bool) or not isinstance(fresh_per_step, int) or not (
                0 <= fresh_per_step <= self.batch_size):
            raise ValueError(f"fresh_per_step must be an integer in [0, batch_size={self.batch_size}], "
                             f"got {fresh_per_step!r}")
        if fresh_per_step and fresh_solve is None:
            raise ValueError("fresh_per_step > 0 needs fresh_solve, the teacher's solve on a device")
        self.fresh = (FreshTrajectories(FreshStream.of_manifest(self.manifest, fresh_per_step, str(self.data_dir)),
                                        fresh_solve) if fresh_per_step else None)

    @property
    def stored_per_step(self) -> int:
        """Stored training trajectories in each step's batch."""
        return self.batch_size - (self.fresh.per_step if self.fresh is not None else 0)

    def train_dataloader(self):
        self.setup()
        if self.stored_per_step == 0:
            return itertools.repeat(self.empty_batch())
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StepBatchOrder(len(self.train_set), self.stored_per_step, self.seed, rank, world,
                                   start_step=lambda: trainer.global_step if trainer is not None else 0)
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=VerifyFirst(sampler, self.train_set),
                                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                           pin_memory=torch.cuda.is_available())

    def empty_batch(self) -> tuple[torch.Tensor, ...]:
        """A batch of no stored trajectory, shaped as a loaded one: (x_T [0, C, H, W], states
        [0, M, C, H, W], and labels [0] in a conditional data set)."""
        shape = tuple(self.state_shape)
        batch = (torch.zeros((0, *shape)), torch.zeros((0, len(self.times), *shape)))
        return (*batch, torch.zeros(0, dtype=torch.int64)) if LABELS in self.manifest.roles else batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A training batch on its device gets the step's fresh trajectories appended (after the stored
        ones); the step is the trainer's global step, the one this batch trains."""
        trainer = self.trainer
        if self.fresh is None or trainer is None or not trainer.training:
            return batch
        device = batch[0].device
        fresh = self.fresh.batch(trainer.global_step, trainer.global_rank, trainer.world_size, device)
        return tuple(torch.cat([stored, new.to(stored.dtype)]) for stored, new in zip(batch, fresh, strict=True))

    def train_subset_indices(self) -> np.ndarray:
        """A fixed subset of the training trajectories, as many as the val split holds: evenly spaced
        over the (sorted) train indices, so it depends on the split alone."""
        train, val = self.split_indices()
        if not len(val):
            return train[:0]
        return train[np.linspace(0, len(train) - 1, len(val)).round().astype(np.int64)]

    def held_out_loaders(self) -> dict[str, DataLoader]:
        """{"val": the held-out trajectories, "train_subset": `train_subset_indices`}, in order, unshuffled;
        {} without a val split (data.val_fraction=0)."""
        self.setup()
        if not len(self.val_set):
            return {}
        subset = Subset(self.dataset, self.train_subset_indices())
        return {"val": self._loader(self.val_set, shuffle=False), "train_subset": self._loader(subset, shuffle=False)}

    def split_record(self) -> dict[str, Any]:
        """What identifies the split: a resumed run must hold out the same trajectories."""
        _, val = self.split_indices()
        return {"num_trajectories": int(self.manifest.num_trajectories), "num_val": int(len(val)),
                "val_sha256": hashlib.sha256(np.asarray(val, dtype="<i8").tobytes()).hexdigest()}
