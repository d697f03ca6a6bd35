"""The training stage's data module: dsno.data's deterministic train/val split, with a train
loader whose batches are a pure function of (seed, global step, rank), so a resumed run sees
exactly the batches an uninterrupted one would (see StepBatchOrder). Each batch's shards are
verified (sha256, finite values) in the main process before the batch is loaded (VerifyFirst).

The val split is held out: trajectory g's noise depends on (data seed, g) only, the batch order
draws from the train indices only, so no val trajectory's noise is ever trained on. Validation is
`dsno.training.validation.HeldOutValidation`'s (on `held_out_loaders`), not Lightning's val loop."""

from __future__ import annotations

import hashlib
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from dsno.data import TrajectoryDataModule
from dsno.data.dataset import VerifyFirst
from dsno.training.batch_order import StepBatchOrder


class StepTrajectoryData(TrajectoryDataModule):
    # Lightning's own val loop does not run: HeldOutValidation validates inside the training step, so
    # the step-s checkpoint holds the step-s validation (an exact resume)
    val_dataloader = L.LightningDataModule.val_dataloader

    def train_dataloader(self):
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StepBatchOrder(len(self.train_set), self.batch_size, self.seed, rank, world,
                                   start_step=lambda: trainer.global_step if trainer is not None else 0)
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=VerifyFirst(sampler, self.train_set),
                                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                           pin_memory=torch.cuda.is_available())

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
