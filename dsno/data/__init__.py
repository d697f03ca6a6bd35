"""Trajectory data sets: teacher trajectories stored as checksummed, memory-mappable shards.

    manifest = generate_dataset(out_dir, solve=solve, fingerprint=fp, num_trajectories=N,
                                shard_size=S, state_shape=(C, H, W), seed=0, batch_size=B)
    verify_dataset(out_dir)                      # sha256 + finite values of every shard, or CorruptShardError
    ds = TrajectoryDataset(out_dir)              # ds[i] -> (x_T [C, H, W], states [M, C, H, W]), and
                                                 # label (int64 scalar) in a conditional data set; each
                                                 # shard is verified (sha256, finite) before first use
    dm = TrajectoryDataModule(out_dir, batch_size=64)

The reading side (`dsno.data.dataset`, which imports Lightning) loads on first use, so the
generation side starts fast.
"""

from typing import Any

from dsno.data.generate import (generate_dataset, label_rule, merge_manifest, resolve_rank, trajectory_labels,
                                trajectory_noise)
from dsno.data.manifest import (
    CorruptShardError,
    DatasetError,
    DatasetNotFoundError,
    DatasetTooLargeError,
    FingerprintMismatchError,
    FolderLockedError,
    InsufficientDiskSpaceError,
    Manifest,
    NonFiniteStatesError,
    check_fingerprint,
    load_manifest,
    make_fingerprint,
)
from dsno.data.shards import verify_dataset

__all__ = [
    "CorruptShardError", "DatasetError", "DatasetNotFoundError", "DatasetTooLargeError",
    "FingerprintMismatchError", "FolderLockedError", "InsufficientDiskSpaceError", "Manifest",
    "NonFiniteStatesError", "TrajectoryDataModule", "TrajectoryDataset",
    "check_fingerprint", "generate_dataset", "label_rule", "load_manifest", "make_fingerprint", "merge_manifest",
    "resolve_rank", "trajectory_labels", "trajectory_noise", "verify_dataset",
]


def __getattr__(name: str) -> Any:
    if name in ("TrajectoryDataset", "TrajectoryDataModule"):
        from dsno.data import dataset  # deferred: loads Lightning only when used

        return getattr(dataset, name)
    raise AttributeError(f"module 'dsno.data' has no attribute {name!r}")
