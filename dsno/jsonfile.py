"""The one reader of JSON that comes from disk: bounded in size and nesting before it is parsed.

    config = read_json_file(path, SamplerFileError, hint, expect=dict)   # a JSON object, or one error line
    record = parse_json(text, "weights.safetensors metadata 'x'", TeacherLoadError, hint, expect=dict)

A file larger than `max_bytes` (a 20 GB sparse file) or nested deeper than MAX_DEPTH (a 200,000-deep
array would exhaust Python's recursion) is refused by name before `json.loads` sees it; so is a file
whose top level is not of the `expect`ed type. Messages never quote the file's content.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

MAX_BYTES = 64 << 20        # 64 MiB: far above any config, record or manifest dsno writes
MAX_DEPTH = 64              # the deepest dsno file nests 5 levels
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_TYPE_NAMES = {dict: "a JSON object", list: "a JSON array"}


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text (strings skipped), without parsing it."""
    steps = (_STEP[b] for b in _BRACKET.findall(_STRING.sub("", text)))
    return max(itertools.accumulate(steps, initial=0))


def parse_json(text: str | bytes, where: str, error: type[Exception], hint: str,
               expect: type | None = None, max_bytes: int = MAX_BYTES) -> Any:
    """The parsed JSON `text` read from `where` (named in every error); `error(...)` ending with
    `hint` when it is too large, too deep, not JSON, or (with `expect`) not of that type."""
    if len(text) > max_bytes:
        raise error(f"{where} holds {len(text):,} bytes, more than the {max_bytes:,} allowed; {hint}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{where} is not UTF-8 text; {hint}") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise error(f"{where} nests deeper than {MAX_DEPTH} levels; {hint}")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        reason = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "too deep"
        raise error(f"{where} is not valid JSON ({reason}); {hint}") from None
    if expect is not None and not isinstance(value, expect):
        what = _TYPE_NAMES.get(expect, expect.__name__)
        raise error(f"{where} must hold {what}, not a JSON {_json_type(value)}; {hint}")
    return value


def read_json_file(path: str | os.PathLike, error: type[Exception], hint: str, expect: type | None = None,
                   max_bytes: int = MAX_BYTES) -> Any:
    """The parsed JSON of a user's file; `error` (naming the file, ending with `hint`) when it is
    missing, unreadable, larger than `max_bytes` (checked before reading), nested deeper than
    MAX_DEPTH, not JSON, or (with `expect`) not of that type."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path} is {size:,} bytes, more than the {max_bytes:,} a JSON file may hold here; {hint}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{path} is missing; {hint}") from None
    except OSError as e:
        raise error(f"{path} is not readable ({e.strerror or type(e).__name__}); {hint}") from None
    return parse_json(data, str(path), error, hint, expect, max_bytes)


def excerpt(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: errors name a bad value without echoing a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _json_type(value: Any) -> str:
    kinds = ((dict, "object"), (list, "array"), (str, "string"), (bool, "boolean"), ((int, float), "number"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def read_bookkeeping(path: str | os.PathLike, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """A bookkeeping record dsno keeps beside its outputs (a lock holder, W&B run ids, completion
    stamps): the JSON object in `path`, or {} when it is missing, unreadable, larger than `max_bytes`,
    too deep, not JSON or not an object. Such a file is never worth a failure."""
    class _Unusable(Exception):
        pass
    try:
        return read_json_file(path, _Unusable, "", expect=dict, max_bytes=max_bytes)
    except _Unusable:
        return {}
