"""Fresh teacher trajectories solved during training (train.fresh_per_step = f > 0).

Each optimizer step's batch holds train.batch_size - f stored training trajectories and f fresh ones:
the trajectories `dsno.data.stream.FreshStream` numbers for (step, rank, world size), solved by the
teacher stage's own solve on the training device (a GPU when training runs on one). The data module
(`dsno.training.data.StepTrajectoryData.on_after_batch_transfer`) appends them to each training batch
once it is on the device; `FreshSolveTime` logs what each step's solve cost (train/fresh_solve_s).
"""

from __future__ import annotations

import time
from typing import Callable

import lightning as L
import torch

from dsno.data.stream import FreshStream

# solve(x_T [f, C, H, W], labels [f] long or None) -> states [f, M, C, H, W] float32
Solve = Callable[..., torch.Tensor]

FRESH_SOLVE_METRIC = "train/fresh_solve_s"


class FreshTrajectories:
    """The fresh part of each training batch. `make_solve(device)` builds the teacher's solve on a
    device (`dsno.stages.trajectories.teacher_solve`); it is built once, on the first batch's device.
    `seconds`: wall time of the last solve (inputs drawn, solved, states back), 0 before any."""

    def __init__(self, stream: FreshStream, make_solve: Callable[[torch.device], Solve]):
        self.stream, self.make_solve = stream, make_solve
        self._solve: tuple[torch.device, Solve] | None = None
        self.seconds = 0.0

    @property
    def per_step(self) -> int:
        return self.stream.per_step

    def solve_on(self, device: torch.device) -> Solve:
        if self._solve is None or self._solve[0] != device:
            self._solve = (device, self.make_solve(device))
        return self._solve[1]

    def batch(self, step: int, rank: int, world_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(x_T [f, C, H, W], states [f, M, C, H, W], and labels [f] for a conditional teacher) on
        `device`: the fresh trajectories of (step, rank, world_size), as a stored batch holds them."""
        solve = self.solve_on(torch.device(device))
        start = time.perf_counter()
        x_T, labels = self.stream.inputs(step, rank, world_size)
        with torch.no_grad():
            states = solve(x_T) if labels is None else solve(x_T, labels)
        batch = (x_T, states.to(torch.float32)) if labels is None else (x_T, states.to(torch.float32), labels)
        batch = tuple(t.to(device) for t in batch)
        self.seconds = time.perf_counter() - start
        return batch


class FreshSolveTime(L.Callback):
    """Logs train/fresh_solve_s, the seconds the data module's fresh solve took this step (the cost of
    streaming: compare with the step's whole time)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fresh = getattr(trainer.datamodule, "fresh", None)
        if fresh is not None:
            pl_module.log(FRESH_SOLVE_METRIC, fresh.seconds)
