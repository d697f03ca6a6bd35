"""The order of training batches: index batches that depend only on (seed, global step, rank), for exact
resume and DDP. A torch Sampler, named for what it decides ("sampler" in dsno is the exported model)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch


class StepBatchOrder(torch.utils.data.Sampler):
    """Infinite stream of index batches. Step s of epoch e = s // steps_per_epoch draws from the
    permutation torch.randperm(n, Generator(seed + e)); each rank takes its own slice of the
    global batch (batch_size * world_size). Iteration starts at `start_step()`, read lazily, so a
    resumed run sees exactly the batches an uninterrupted run would have seen from that step on.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: Callable[[], int] = lambda: 0):
        if num_items < batch_size * world_size:
            raise ValueError(f"the data set has {num_items} items, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks); generate more or lower train.batch_size")
        self.n, self.bs, self.seed = num_items, batch_size, seed
        self.rank, self.world = rank, world_size
        self.start_step = start_step
        self.global_bs = batch_size * world_size
        self.steps_per_epoch = num_items // self.global_bs
        self._perm: tuple[int, torch.Tensor] | None = None

    def batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)))
        lo = k * self.global_bs + self.rank * self.bs
        return self._perm[1][lo: lo + self.bs].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = int(self.start_step())
        while True:
            yield self.batch(step)
            step += 1
