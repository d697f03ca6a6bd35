"""Fresh teacher trajectories for training (train.fresh_per_step): which ones, and their inputs.

With f fresh trajectories per optimizer step, rank r of a world of w ranks gets at step s the
trajectories

    g = N + (s * w + r) * f + i,   i < f,    N = num_trajectories of the stored set,

numbered as the stored set numbers its own: x_T is `trajectory_noise(seed, g, g + 1, shape)` and the
label (conditional teachers) `trajectory_labels(seed, g, g + 1, class_weights)`, with the seed and
label rule of the stored set, so solved by the teacher stage's solve they are exactly what that stage
would store at index g. None is a stored (held-out) trajectory (g >= N), no two (step, rank) pairs
share one, and they depend on (step, rank, world size) alone, so a resumed run trains on the same ones.
The solve itself (on the training device) is `dsno.training.fresh`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dsno.data.generate import NOISE_DESCRIPTION, trajectory_labels, trajectory_noise
from dsno.data.manifest import GENERATE_HINT, LABELS, DatasetError, Manifest


def fresh_indices(num_stored: int, per_step: int, step: int, rank: int = 0, world_size: int = 1) -> range:
    """The trajectory indices of (step, rank) out of world_size ranks, `per_step` a step per rank, past
    the `num_stored` stored ones: range(N + (step * world_size + rank) * per_step, ... + per_step)."""
    for name, v, lo in (("num_stored", num_stored, 0), ("per_step", per_step, 0), ("step", step, 0),
                        ("world_size", world_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size}")
    start = num_stored + (step * world_size + rank) * per_step
    return range(start, start + per_step)


@dataclass(frozen=True)
class FreshStream:
    """The fresh trajectories' inputs for a stored set of `num_stored` trajectories made with `seed`
    (state_shape [C, H, W]; class_weights: its label rule's weights, None when unconditional)."""

    seed: int
    num_stored: int
    per_step: int
    state_shape: tuple[int, ...]
    class_weights: tuple[float, ...] | None = None

    @classmethod
    def of_manifest(cls, manifest: Manifest, per_step: int, where: str = "the data set") -> FreshStream:
        """The stream that continues the stored set `manifest` describes: its seed, count, shape and
        label rule. DatasetError (one line) when its noise was drawn by another rule than dsno's."""
        if manifest.noise != NOISE_DESCRIPTION:
            raise DatasetError(f"{where} records another noise rule ({manifest.noise!r}) than dsno's "
                               f"trajectory_noise, so fresh trajectories cannot continue it: regenerate it "
                               f"(`{GENERATE_HINT}`) or set train.fresh_per_step=0")
        rule = manifest.fingerprint.get(LABELS)
        weights = None if rule is None else tuple(float(w) for w in rule["class_weights"])
        return cls(manifest.seed, manifest.num_trajectories, per_step, tuple(manifest.state_shape), weights)

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> range:
        """`fresh_indices` of (step, rank, world_size) for this stream."""
        return fresh_indices(self.num_stored, self.per_step, step, rank, world_size)

    def inputs(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_T float32 [f, C, H, W] on the CPU, labels int64 [f] or None) of (step, rank, world_size)."""
        g = self.indices(step, rank, world_size)
        return trajectory_inputs(self.seed, g, self.state_shape, self.class_weights)


def trajectory_inputs(seed: int, indices: range, state_shape: Sequence[int],
                      class_weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x_T, labels or None) of the trajectories `indices` (a contiguous range) of data set `seed`: the
    teacher stage's `trajectory_noise` and, given class_weights, `trajectory_labels`."""
    x_T = trajectory_noise(seed, indices.start, indices.stop, state_shape)
    if class_weights is None:
        return x_T, None
    return x_T, torch.from_numpy(trajectory_labels(seed, indices.start, indices.stop, class_weights))
