"""The training stage's data module: dsno.data's deterministic train/val split, with a train
loader whose batches are a pure function of (seed, global step, rank), so a resumed run sees
exactly the batches an uninterrupted one would (see StepBatchOrder). Each batch's shards are
verified (sha256, finite values) in the main process before the batch is loaded (VerifyFirst)."""

from __future__ import annotations

import torch

from dsno.data import TrajectoryDataModule
from dsno.data.dataset import VerifyFirst
from dsno.training.batch_order import StepBatchOrder


class StepTrajectoryData(TrajectoryDataModule):
    def train_dataloader(self):
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StepBatchOrder(len(self.train_set), self.batch_size, self.seed, rank, world,
                                   start_step=lambda: trainer.global_step if trainer is not None else 0)
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=VerifyFirst(sampler, self.train_set),
                                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                           pin_memory=torch.cuda.is_available())
