"""The solver registry: every solver with its orders, options and cost in model evaluations.

A solver is a plain function with one signature (k-diffusion style),

    fn(teacher, x, ts, *, order=..., return_trajectory=False, **options) -> Tensor

registered with `@register(...)`, which returns a checked entry point: the order must be one
the solver has, every option one it takes, the grid valid for the teacher's schedule.
`available()`, `nfe()` and `steps_for_nfe()` answer from the registry without running anything.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from dsno.solvers.grids import check_grid

Cost = Callable[[int, int, Mapping[str, Any]], int]
_REGISTRY: dict[str, "SolverSpec"] = {}
_COMMON = ("order", "return_trajectory")


@dataclass(frozen=True)
class SolverSpec:
    """name; fn: the checked entry point; orders: the orders it has (default_order first in
    its signature); cost(steps, order, options) -> model evaluations; cost_rule: cost in words;
    options: name -> default; stochastic: integrates the reverse SDE (its sample depends on the
    noise, so it converges to the data distribution, not to the ODE's sample path); grid(options):
    the grid used when ts is omitted (a solver that carries its own timesteps, e.g. usf), else None;
    fingerprint(options): entries beyond name, order and options that identify what it computes (e.g.
    the hash of a solver schedule's decisions, not its path), else None; check(options, order, t_end, times):
    raises OptionError when the options can't make a solve ending at t_end through `times`, else None;
    process: "scalar" (a Teacher on a VP / VE / flow schedule) or "augmented" (a teacher of a linear
    process with k components per pixel, e.g. PSLD; `dsno.solvers.psld`)."""

    name: str
    fn: Callable[..., torch.Tensor]
    orders: tuple[int, ...]
    default_order: int
    cost: Cost
    cost_rule: str
    options: Mapping[str, Any]
    stochastic: bool
    grid: Callable[[Mapping[str, Any]], Any] | None = None
    process: str = "scalar"
    fingerprint: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    check: Callable[..., None] | None = None

    def resolve(self, order: Any, options: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """The order to use (default when None) and the full option set; raise on bad ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ValueError(f"solver {self.name!r} has no option {unknown[0]!r}; its options are: {known}")
        if order is None:
            order = self.default_order
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in self.orders:
            lo, hi = min(self.orders), max(self.orders)
            have = f"order {lo}" if lo == hi else f"orders {lo}..{hi}"
            raise ValueError(f"solver {self.name!r} has {have}, got order={order!r}")
        return int(order), {**self.options, **options}


def register(name: str, *, orders: Sequence[int], cost: Cost, cost_rule: str, stochastic: bool = False,
             grid: Callable[[Mapping[str, Any]], Any] | None = None, process: str = "scalar",
             fingerprint: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
             check: Callable[..., None] | None = None) -> Callable:
    """Register `fn` under `name`; its keyword-only parameters after `order` and
    `return_trajectory` are its options (with their defaults); `order`'s default is the solver's.
    grid, fingerprint, check: the solver's own special cases (see SolverSpec)."""

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        params = list(inspect.signature(fn).parameters.values())
        if [p.name for p in params[:3]] != ["teacher", "x", "ts"] or \
                [p.name for p in params[3:5]] != list(_COMMON):
            raise TypeError(f"solver {name!r} must have the signature "
                            f"(teacher, x, ts, *, order, return_trajectory, ...)")
        options = {p.name: p.default for p in params[5:]}

        @functools.wraps(fn)
        def entry(teacher: Any, x: torch.Tensor, ts: Any = None, *, order: int | None = None,
                  return_trajectory: bool = False, **opts: Any) -> torch.Tensor:
            order, opts = spec.resolve(order, opts)
            _check_teacher(teacher, name, process)
            if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 1 and x.shape[0] > 0):
                raise ValueError(f"x must be a floating-point tensor [B, ...] with B >= 1, got "
                                 f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
            if ts is None:
                if spec.grid is None:
                    raise ValueError(f"solver {name!r} needs a grid ts (e.g. dsno.timesteps(schedule, steps=10))")
                ts = spec.grid(opts)
            grid = check_grid(teacher.schedule if process == "scalar" else teacher.process, ts)
            keep = trajectory_indices(return_trajectory)
            return fn(teacher, x, grid, order=order, return_trajectory=keep, **opts)

        spec = SolverSpec(name=name, fn=entry, orders=tuple(orders), default_order=params[3].default,
                          cost=cost, cost_rule=cost_rule, options=options, stochastic=stochastic, grid=grid,
                          process=process, fingerprint=fingerprint, check=check)
        if spec.default_order not in spec.orders:
            raise TypeError(f"solver {name!r}: default order {spec.default_order} not in {spec.orders}")
        _REGISTRY[name] = spec
        return entry

    return decorate


class OptionError(ValueError):
    """A solver's option (or order) that can't make the solve asked for: `option` names it (e.g.
    "solver_schedule", "order"), `value` is what was given (NO_VALUE: the message shows what is wrong with
    it), the message says why and how to fix it."""

    NO_VALUE = object()

    def __init__(self, option: str, value: Any, reason: str):
        super().__init__(reason)
        self.option, self.value = option, value


def with_option(option: str) -> list[str]:
    """The registered solvers (all processes) that take the option `option`, sorted."""
    return sorted(n for n, spec in _REGISTRY.items() if option in spec.options)


def trajectory_indices(value: Any) -> "bool | tuple[int, ...]":
    """return_trajectory as the solvers take it: a bool, or a sorted tuple of distinct grid
    indices >= 0 (the states to keep; x_T is index 0, the denoise_to_zero output len(ts))."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple, range)) and value and all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in value):
        keep = tuple(sorted({int(i) for i in value}))
        if len(keep) == len(value):
            return keep
    raise ValueError(f"return_trajectory must be True, False or a non-empty list of distinct grid indices >= 0, "
                     f"got {value!r}")


def _check_teacher(teacher: Any, solver: str = "", process: str = "scalar") -> None:
    augmented = bool(getattr(teacher, "augmented", False))
    if process == "augmented" and not augmented:
        raise ValueError(f"solver {solver!r} integrates an augmented process (e.g. PSLD, z = (x, m)); for a "
                         f"{type(teacher).__name__} use dsno.solvers.psld.as_augmented(teacher) or one of: "
                         f"{', '.join(available())}")
    if process == "scalar" and augmented:
        raise ValueError(f"solver {solver!r} integrates a scalar diffusion (VP / VE / flow); this "
                         f"{type(teacher).__name__} is augmented, use one of: {', '.join(available('augmented'))}")
    if process == "augmented":
        return
    if not all(hasattr(teacher, a) for a in ("schedule", "eps", "x0")):
        raise ValueError(f"teacher must provide .schedule, .eps(x, t) and .x0(x, t) (a dsno.teachers.Teacher), "
                         f"got {type(teacher).__name__}")


def get(name: str) -> SolverSpec:
    """The registry entry of a solver; a clear error lists the names when it is unknown."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def available(process: str | None = "scalar") -> list[str]:
    """The registered solver names, sorted: those for scalar teachers (VP / VE / flow, the default),
    process="augmented" those for augmented ones (PSLD), None all."""
    return sorted(n for n, spec in _REGISTRY.items() if process is None or spec.process == process)


def _check_count(label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    return int(value)


def nfe(solver: str, steps: int, order: int | None = None, **options: Any) -> int:
    """Model evaluations a run of `solver` on a grid of `steps` steps costs."""
    spec = get(solver)
    order, opts = spec.resolve(order, options)
    return spec.cost(_check_count("steps", steps), order, opts)


def steps_for_nfe(solver: str, nfe: int, order: int | None = None, **options: Any) -> int:
    """Grid steps that spend exactly `nfe` model evaluations; ValueError listing the budgets
    the solver can meet when `nfe` is not one of them."""
    spec = get(solver)
    order, opts = spec.resolve(order, options)
    budget = _check_count("nfe", nfe)
    for steps in range(1, budget + 2):          # budget + 1: an analytic first step saves one evaluation
        if spec.cost(steps, order, opts) == budget:
            return steps
    limit = max(12, budget + 2 * max(spec.orders) + 1)
    can = sorted({c for c in (spec.cost(s, order, opts) for s in range(1, limit + 1)) if c <= limit})
    raise ValueError(f"solver {solver!r} (order {order}) cannot spend exactly {budget} model evaluations: it costs "
                     f"{spec.cost_rule}; budgets it can meet up to {limit}: {', '.join(map(str, can))}")


def choice(option: str, value: Any, allowed: Sequence[Any]) -> Any:
    """`value` if it is one of `allowed`, else a ValueError naming the option."""
    if value not in allowed:
        raise ValueError(f"option {option}={value!r} is not one of: {', '.join(map(repr, allowed))}")
    return value


def reject_unused(context: str, **given: tuple[Any, Any]) -> None:
    """Raise if an option that does not apply in `context` was set away from its default.
    given: name -> (value, default)."""
    for option, (value, default) in given.items():
        if value != default:
            raise ValueError(f"option {option}={value!r} does not apply to {context}")
