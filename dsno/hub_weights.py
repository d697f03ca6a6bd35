"""Weights that other tools would download into torch's hub cache, located offline.

    hub_weights_path(path, "vgg16-397923af.pth", missing="VGG-16 weights ... not found at {path}; ...")

`path` when given, else `<torch hub dir>/checkpoints/<file_name>`; a missing file is one line
(`UserFileNotFoundError`) built from `missing` with {path} and {default} filled in.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dsno.errors import UserFileNotFoundError


def hub_default(file_name: str) -> Path:
    """Where torch.hub would keep `file_name`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def hub_weights_path(path: str | os.PathLike | None, file_name: str, missing: str) -> Path:
    """The existing weights file: `path`, else the hub cache's `file_name`; never downloads."""
    default = hub_default(file_name)
    p = Path(path) if path is not None else default
    if not p.is_file():
        raise UserFileNotFoundError(missing.format(path=p, default=default))
    return p
