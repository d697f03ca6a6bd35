"""The LightningDataModule of the training stage: memory-mapped trajectories, a deterministic
train/val split, and step-indexed batches (exact resume; each DDP rank takes its own slice)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from dsno.training.sampler import StepBatchSampler


class StepTrajectoryData(L.LightningDataModule):
    def __init__(self, data_dir: str | Path, batch_size: int, seed: int = 0, val_fraction: float = 0.05,
                 num_workers: int = 0, verify: str = "quick", expected_fingerprint: dict[str, Any] | None = None):
        super().__init__()
        self.data_dir, self.batch_size, self.seed = Path(data_dir), batch_size, seed
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.verify, self.expected = verify, expected_fingerprint
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from dsno.data import TrajectoryDataset
        full = TrajectoryDataset(self.data_dir, verify=self.verify, expected_fingerprint=self.expected)
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(round(self.val_fraction * len(full)))
        self.val_set = torch.utils.data.Subset(full, perm[:n_val])
        self.train_set = torch.utils.data.Subset(full, perm[n_val:])

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StepBatchSampler(len(self.train_set), self.batch_size, self.seed, rank, world,
                                   start_step=lambda: trainer.global_step if trainer is not None else 0)
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.num_workers,
                                           persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        if not len(self.val_set):
            return []
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False,
                                           num_workers=self.num_workers)
