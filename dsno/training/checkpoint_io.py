"""Checkpoint I/O that survives a crash as well as an interrupt, and loads only tensors."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from dsno.atomic import atomic_path, write_bytes_no_follow
from dsno.errors import UnsafeFileError


class CheckpointRefusedError(UnsafeFileError):
    """A checkpoint is corrupt or holds more than tensors and plain values."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO plus what it lacks.

    Lightning already writes atomically (torch.save to memory, then an fsspec transaction that
    moves a temp file onto the name), but it never fsyncs: after a power loss the renamed file can
    be empty. It also loads with whatever `weights_only` the caller passes, and a full disk is an
    OSError traceback. This class: torch.save into memory, then dsno.atomic's temp file + fsync +
    rename + folder fsync (a full disk is `DiskFullError` naming the path, no temp file left; torch's
    own zip writer, writing to a file, turns ENOSPC into "unexpected pos" and can abort the process
    from its destructor; a link at the path is refused, `LinkRefusedError`); loading always weights_only=True
    (no code runs), a refused or corrupt file is one `CheckpointRefusedError` line."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            write_bytes_no_follow(tmp, buffer.getbuffer(), exclusive=False)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:   # torch raises many types for a truncated file or a foreign pickle
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointRefusedError(
                f"refusing to load checkpoint {Path(path)}: it is corrupt or holds objects other than tensors "
                f"and plain values (only weights_only=True loading is allowed; {reason[:160]}); delete it, or "
                "set train.resume=false to start over") from None
