"""Teacher kinds: each names its config dataclass (a `dsno.config.TeacherConfig` subclass: the keys
`teacher.*` may hold for it) and its loader (config -> Teacher). A kind registers itself in its own
module with `@register_teacher(name, config)`; `teacher_kinds()` is what `teacher=NAME`, the config
schema and `dsno.builders.build_teacher` read.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsno.teachers.base import TeacherLoadError

BUILTIN_MODULES = ("dsno.teachers.mnist_gmm", "dsno.teachers.mnist_gmm_cond", "dsno.teachers.gmm",
                   "dsno.teachers.unet", "dsno.teachers.diffusers", "dsno.teachers.psld_gmm", "dsno.teachers.psld_unet")
_KINDS: dict[str, "TeacherKind"] = {}


@dataclass(frozen=True)
class TeacherKind:
    """name: the `teacher.kind` value; config: its dataclass; load(config) -> Teacher; digits: trained on
    the shipped MNIST digits (eval scores it against them by default)."""

    name: str
    config: type
    load: Callable[[Any], Any]
    digits: bool = False


def register_teacher(name: str, config: type, digits: bool = False) -> Callable:
    """Decorator: register `load(config) -> Teacher` as teacher kind `name` with config dataclass `config`;
    digits: the kind's teachers are trained on the shipped MNIST digits."""

    def decorate(load: Callable[[Any], Any]) -> Callable[[Any], Any]:
        if getattr(config, "kind", None) != name:
            raise TypeError(f"teacher kind {name!r}: its config {config.__name__} must default kind={name!r}")
        def checked_load(c: Any) -> Any:
            refuse_diffusers_folder(name, getattr(c, "path", None))
            return load(c)

        _KINDS[name] = TeacherKind(name, config, checked_load, digits)
        return load

    return decorate


DIFFUSERS_MARKERS = ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "scheduler_config.json")


def is_diffusers_folder(path: str | Path | None) -> bool:
    """True when `path` is a folder in a diffusers layout (model_index.json, unet/config.json or a scheduler config)."""
    return path is not None and Path(path).is_dir() and any((Path(path) / m).is_file() for m in DIFFUSERS_MARKERS)


def refuse_diffusers_folder(kind: str, path: str | Path | None) -> None:
    """A diffusers folder given to another teacher kind: one line naming `teacher=diffusers`, instead of
    that kind's "weights not found"."""
    if kind != "diffusers" and is_diffusers_folder(path):
        raise TeacherLoadError(f"teacher.path={path} is a diffusers model folder, which teacher.kind={kind} does "
                               f"not read: add teacher=diffusers to the command (teacher=diffusers teacher.path={path})")


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
