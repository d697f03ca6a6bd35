"""Value checks of configuration keys: each raises one `ConfigError` line that names the key, the
value and what is allowed ("config error: KEY=VALUE: ...").

    count("data.num_trajectories", 0, 10**9, "why the bound")   # an integer in [lo, hi]
    in_range("solver.t_end", 2.0, 0.0, 1.0, lo_open=True)         # a finite number in a range
    choice("export.forms", "zip", ("safetensors", "pt2", "onnx"))

The run config (`dsno.config`), the teachers' configs, the search's config and the stages use
these; this module depends on nothing of dsno's but its errors.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

from dsno.errors import UserError


class ConfigError(UserError):
    """A configuration value is wrong. The message names the key, the value and what is allowed."""


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config error: {key}={value!r}: {allowed}")


def choice(key: str, value: Any, options: tuple | list) -> None:
    if value not in options:
        fail(key, value, f"must be one of {', '.join(map(str, options))}")


def count(key: str, value: Any, hi: int, why: str, lo: int = 1) -> None:
    """An integer in [lo, hi]; `why` says where the upper bound comes from."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        fail(key, value, "must be a positive integer" if lo == 1 else f"must be an integer >= {lo}")
    if value > hi:
        fail(key, value, f"must be at most {hi:,}: {why}")


def finite(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(key, value, "must be a finite number")


def in_range(key: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    finite(key, value)
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        fail(key, value, f"must lie in {lb}{lo:g}, {hi:g}{rb}")


def existing_path(key: str, value: Optional[str], what: str) -> None:
    if value is not None and not os.path.exists(value):
        fail(key, value, f"does not exist; give {what}")


SEED_MAX = 2**63 - 1
