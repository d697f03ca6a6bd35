"""Reading a trajectory data set: a memory-mapped `Dataset` and a `LightningDataModule`.

Items are read straight from the memory-mapped shard files, one trajectory at a time, so the
process's memory does not grow with the data set (pages are the kernel's, shared and evictable).
No byte of a shard reaches a batch before that shard's sha256 and values are verified (`verify`).
"""

from __future__ import annotations

import os
import resource
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset

from dsno.data.manifest import (
    GENERATE_HINT,
    LABELS,
    MANIFEST_NAME,
    CorruptShardError,
    DatasetError,
    Manifest,
    check_fingerprint,
    load_manifest,
)
from dsno.data.shards import find_bad_shards, map_npy, role_dtype
from dsno.data.verify import ShardVerifier

VERIFY_MODES = ("none", "quick", "full")


def _default_max_open_shards() -> int:
    # Each mapped file keeps one descriptor; leave most of the limit to the rest of the process.
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, (soft if soft != resource.RLIM_INFINITY else 65536) // 8)


class TrajectoryDataset(Dataset):
    """Trajectories of a data set folder: item i -> (x_T [C, H, W], states [M, C, H, W]), float32,
    and in a conditional data set (`has_labels`) its class label, an int64 scalar tensor, third.

    verify: "quick" (the default) checks every shard file's size and header at construction, and
        each shard's sha256 and finite values lazily, before its first item is returned (skipping
        files the folder's `verified.json` records as verified in this exact version); "full" reads
        every shard at construction, ignoring that cache; "none" trusts the manifest.
    expected_fingerprint: keys that must match the data set's fingerprint (`check_fingerprint`).
    max_open_shards: shards kept mapped at once per process (least recently used are unmapped);
        default from the open-file limit.
    """

    def __init__(self, data_dir: str | os.PathLike, verify: str = "quick",
                 expected_fingerprint: Mapping[str, Any] | None = None, max_open_shards: int | None = None):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.folder = Path(data_dir)
        self.manifest: Manifest = load_manifest(self.folder)
        if not self.manifest.complete:
            raise DatasetError(f"data set in {self.folder} is unfinished ({len(self.manifest.shards)}/"
                               f"{self.manifest.num_shards} shards); fix: rerun its generation, which resumes: "
                               f"`{GENERATE_HINT}`")
        if expected_fingerprint is not None:
            check_fingerprint(self.manifest, expected_fingerprint, where=str(self.folder / MANIFEST_NAME))
        self.verifier: ShardVerifier | None = None
        if verify != "none":
            problems = find_bad_shards(self.folder, self.manifest, full=False)
            if problems:
                raise CorruptShardError(self.folder, problems)
            self.verifier = ShardVerifier(self.folder, self.manifest, use_cache=verify == "quick")
            if verify == "full":
                problems = self.verifier.check(range(self.manifest.num_shards))
                if problems:
                    raise CorruptShardError(self.folder, problems)
        self.max_open_shards = _default_max_open_shards() if max_open_shards is None else max_open_shards
        if not (isinstance(self.max_open_shards, int) and self.max_open_shards >= 1):
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self._maps: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()

    def verify_items(self, indices: Iterable[int]) -> None:
        """Verify (once) the shards holding trajectories `indices`; `CorruptShardError` if one is bad."""
        if self.verifier is not None:
            n = len(self)
            for shard in sorted({(int(i) % n) // self.manifest.shard_size for i in indices}):
                self.verifier.ensure(shard)

    @property
    def times(self) -> list[float]:
        """The M output times of the stored states."""
        return self.manifest.times

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self.manifest.state_shape

    @property
    def has_labels(self) -> bool:
        """Whether each trajectory comes with a class label (a conditional teacher's data set)."""
        return LABELS in self.manifest.roles

    def __len__(self) -> int:
        return self.manifest.num_trajectories

    def _shard(self, index: int) -> tuple[np.ndarray, ...]:
        maps = self._maps.get(index)
        if maps is not None:
            self._maps.move_to_end(index)
            return maps
        rec = self.manifest.shards[index]
        maps = tuple(map_npy(self.folder / rec.files[role].name, self.manifest.expected_shape(index, role),
                             role_dtype(role)) for role in self.manifest.roles)
        self._maps[index] = maps
        if len(self._maps) > self.max_open_shards:
            self._maps.popitem(last=False)
        return maps

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"trajectory index {i} out of range for a data set of {n}")
        shard, row = divmod(i % n, self.manifest.shard_size)
        if self.verifier is not None:
            self.verifier.ensure(shard)
        return tuple(torch.from_numpy(np.array(array[row])) for array in self._shard(shard))

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) get the description, not the maps: each maps its own lazily.
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state


class VerifyFirst(Sampler):
    """Wraps a sampler (of indices or of index batches) over `subset`: before an index leaves it,
    the shard holding that trajectory is verified, in the process that iterates the sampler (the
    main one, also with DataLoader workers), so a bad shard stops the run with its own error."""

    def __init__(self, sampler: Iterable, subset: Subset):
        self.sampler, self.subset = sampler, subset

    def __iter__(self) -> Iterator:
        dataset, order = self.subset.dataset, self.subset.indices
        for item in self.sampler:
            batch = item if isinstance(item, (list, tuple)) else (item,)
            dataset.verify_items(order[int(i)] for i in batch)
            yield item

    def __len__(self) -> int:
        return len(self.sampler)


class TrajectoryDataModule(L.LightningDataModule):
    """Train/val loaders over a trajectory data set, split deterministically by `seed`.

    `times`, `state_shape` are read from the manifest at construction (before `setup`). Under
    DDP, Lightning puts its distributed sampler on these loaders.
    """

    def __init__(self, data_dir: str | os.PathLike, batch_size: int, num_workers: int = 0,
                 val_fraction: float = 0.05, seed: int = 0,
                 expected_fingerprint: Mapping[str, Any] | None = None, verify: str = "quick"):
        super().__init__()
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.data_dir = Path(data_dir)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.seed = val_fraction, seed
        self.expected_fingerprint, self.verify = expected_fingerprint, verify
        self.manifest = load_manifest(self.data_dir)
        if expected_fingerprint is not None:
            check_fingerprint(self.manifest, expected_fingerprint, where=str(self.data_dir / MANIFEST_NAME))
        self.dataset: TrajectoryDataset | None = None
        self.train_set: Subset | None = None
        self.val_set: Subset | None = None

    @property
    def times(self) -> list[float]:
        return self.manifest.times

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self.manifest.state_shape

    def split_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) trajectory indices: a permutation by `seed`, the first ones for val."""
        n = self.manifest.num_trajectories
        n_val = 0 if self.val_fraction == 0 else max(1, round(n * self.val_fraction))
        if n_val >= n:
            raise DatasetError(f"val_fraction {self.val_fraction} leaves no training data in a data set "
                               f"of {n} trajectories")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).numpy()
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = TrajectoryDataset(self.data_dir, self.verify, self.expected_fingerprint)
            train, val = self.split_indices()
            self.train_set, self.val_set = Subset(self.dataset, train), Subset(self.dataset, val)

    def _loader(self, subset: Subset, shuffle: bool) -> DataLoader:
        order = RandomSampler(subset) if shuffle else SequentialSampler(subset)
        return DataLoader(subset, batch_size=self.batch_size, sampler=VerifyFirst(order, subset),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)
