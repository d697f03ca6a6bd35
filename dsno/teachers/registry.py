"""Teacher kinds: each names its config dataclass (a `dsno.config.TeacherConfig` subclass: the keys
`teacher.*` may hold for it) and its loader (config -> Teacher). A kind registers itself in its own
module with `@register_teacher(name, config)`; `teacher_kinds()` is what `teacher=NAME`, the config
schema and `dsno.builders.build_teacher` read.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

BUILTIN_MODULES = ("dsno.teachers.mnist_gmm", "dsno.teachers.gmm", "dsno.teachers.unet", "dsno.teachers.diffusers",
                   "dsno.teachers.psld_gmm", "dsno.teachers.psld_unet")
_KINDS: dict[str, "TeacherKind"] = {}


@dataclass(frozen=True)
class TeacherKind:
    """name: the `teacher.kind` value; config: its dataclass; load(config) -> Teacher."""

    name: str
    config: type
    load: Callable[[Any], Any]


def register_teacher(name: str, config: type) -> Callable:
    """Decorator: register `load(config) -> Teacher` as teacher kind `name` with config dataclass `config`."""

    def decorate(load: Callable[[Any], Any]) -> Callable[[Any], Any]:
        if getattr(config, "kind", None) != name:
            raise TypeError(f"teacher kind {name!r}: its config {config.__name__} must default kind={name!r}")
        _KINDS[name] = TeacherKind(name, config, load)
        return load

    return decorate


def teacher_kinds() -> dict[str, TeacherKind]:
    """Every registered teacher kind (the built-in ones imported first), by name."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return dict(_KINDS)


def get_teacher_kind(name: str) -> TeacherKind:
    """The teacher kind `name`; ValueError listing the registered ones otherwise."""
    kinds = teacher_kinds()
    if name not in kinds:
        raise ValueError(f"unknown teacher kind {name!r}; the kinds are: {', '.join(kinds)}")
    return kinds[name]
