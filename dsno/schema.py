"""Schema fields: a dataclass field with its one-line help, which `python train.py --help` prints."""

from __future__ import annotations

from dataclasses import field
from typing import Any, Callable

from omegaconf import MISSING


def doc_field(default: Any = MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field with its one-line help, which `python train.py --help` prints beside the key."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": doc})
    return field(default=default, metadata={"help": doc})
