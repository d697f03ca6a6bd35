"""Names dsno has renamed: an old name is refused in one line that names the new one, never aliased.

    __getattr__ = refuse_renamed("dsno", {"sample": "solve"})     # in a module: dsno.sample -> AttributeError
    read_renamed_keys(d, version, {"image_shape": ("state_shape", 2)}, "config", ConfigError)   # a file's keys
"""

from __future__ import annotations

from typing import Any, Callable, Mapping


def refuse_renamed(module: str, renamed: Mapping[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that answers an old attribute name of `renamed` (old -> new) with an
    AttributeError naming the new one, and any other missing name as Python does."""
    def __getattr__(name: str) -> object:
        if name in renamed:
            raise AttributeError(f"{module}.{name} was renamed: use {module}.{renamed[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__


def read_renamed_keys(d: Mapping[str, Any], version: int, renamed: Mapping[str, tuple[str, int]], where: str,
                      error: type[Exception]) -> dict[str, Any]:
    """`d` (a mapping read from a file of format `version`) with every key that a later format renamed
    (renamed: old key -> (new key, the format_version that renamed it)) read under its new name; an old
    key in a file of that format or later is an `error` of one line naming the new key."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key in renamed:
            new, since = renamed[key]
            if version >= since or new in d:
                raise error(f"{where}: key {key!r} is named {new!r} since format_version {since}; rename it {new!r}")
            key = new
        out[key] = value
    return out
