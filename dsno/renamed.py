"""Names dsno has renamed: an old name is refused in one line that names the new one, never aliased.

    __getattr__ = refuse_renamed("dsno", {"sample": "solve"})     # in a module: dsno.sample -> AttributeError
"""

from __future__ import annotations

from typing import Callable, Mapping


def refuse_renamed(module: str, renamed: Mapping[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that answers an old attribute name of `renamed` (old -> new) with an
    AttributeError naming the new one, and any other missing name as Python does."""
    def __getattr__(name: str) -> object:
        if name in renamed:
            raise AttributeError(f"{module}.{name} was renamed: use {module}.{renamed[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__

