"""Checkpoint I/O that never leaves a half-written file under the final name, and loads safely."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<path>.tmp`, fsync, then rename; loads with weights_only=True (no code runs)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise RuntimeError(f"refusing to load checkpoint {path}: it is corrupt or holds objects other than "
                               f"tensors and plain values (only weights_only=True loading is allowed): {e}") from e
