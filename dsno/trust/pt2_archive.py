"""Check a torch.export archive (.pt2) before `torch.export.load` may open it.

torch.export.load unpickles some members (pickled weights and constants, custom and opaque
objects, legacy weight files), compiles the archive's guard code and resolves graph targets
by name. So an archive is opened only when it is made of the members `torch.export.save`
writes for plain tensors, and nothing else:

    <root>/archive_format, archive_version, byteorder, .data/version, .data/serialization_id  short text
    <root>/models/<m>.json                          the graph: ATen targets only, no guard code
    <root>/data/weights/<m>_weights_config.json     every entry use_pickle = false
    <root>/data/constants/<m>_constants_config.json every entry use_pickle = false, tensors only
    <root>/data/weights/weight_<i>, data/constants/tensor_<i>   raw tensor bytes, each listed above
    <root>/data/sample_inputs/<m>.pt                empty

Any other member, a pickled entry, an unlisted payload, a non-ATen target or a symbolic
expression outside a small grammar is refused with `UnsafeFileError` naming the member.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any, Iterator

from dsno.errors import UnsafeFileError
from dsno.jsonfile import parse_json

TEXT_MEMBERS = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")
TEXT_LIMIT = 128          # bytes
JSON_LIMIT = 256 << 20    # bytes of one graph or config member
ALLOWED_TARGET_PREFIXES = ("torch.ops.aten.",)
ALLOWED_TARGETS = frozenset({"torch.ops.higher_order.wrap_with_autocast", "_operator.add", "_operator.sub",
                             "_operator.mul", "_operator.floordiv", "_operator.truediv", "_operator.mod",
                             "_operator.neg", "_operator.getitem", "_operator.eq", "_operator.ne",
                             "_operator.ge", "_operator.gt", "_operator.le", "_operator.lt"})
SYMPY_NAMES = frozenset({"Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "FloorDiv",
                         "CeilDiv", "Mod", "PythonMod", "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToInt",
                         "Eq", "Ne", "Ge", "Gt", "Le", "Lt", "And", "Or", "Not", "True", "False", "oo",
                         "positive", "negative", "nonnegative", "integer", "real", "finite"})
_QUOTED_SYMBOL = re.compile(r"'[su]\d+'")
_EXPR_CHARS = re.compile(r"^[A-Za-z0-9_\s+\-*/%(),.<>=!]*$")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL = re.compile(r"^[su]\d+$")
_MEMBER = re.compile(r"^[A-Za-z0-9_.\-/]+$")


REFUSE_HINT = ("refusing to load it (dsno opens only torch.export archives of plain tensors and ATen operators, "
               "as `python -m dsno.export` writes them)")


def _refuse(path: Any, what: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: {what}; {REFUSE_HINT}")


def check_pt2_archive(path: str | os.PathLike) -> None:
    """Raise UnsafeFileError unless every member of the .pt2 at `path` is on the allow-list."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsafeFileError(f"{path} is not a torch.export archive (not a readable zip: {e}); "
                              "export it again with `python -m dsno.export`") from None
    with archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        if not names:
            raise _refuse(path, "the archive is empty")
        for name in names:
            if not _MEMBER.match(name) or name.startswith("/") or ".." in name.split("/"):
                raise _refuse(path, f"member {name!r} has an unsafe name")
        roots = {name.split("/", 1)[0] for name in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise _refuse(path, f"members must share one root folder, found {sorted(roots)[:4]}")
        root = roots.pop()
        members = {name[len(root) + 1:]: info for name, info in zip(names, infos)}
        if len(members) != len(infos):
            raise _refuse(path, "the archive has duplicate member names")
        _check_members(path, archive, root, members)


def _check_members(path: Any, archive: zipfile.ZipFile, root: str, members: dict[str, zipfile.ZipInfo]) -> None:
    models = sorted(m[len("models/"):-len(".json")] for m in members
                    if m.startswith("models/") and m.endswith(".json") and m.count("/") == 1)
    if not models:
        raise _refuse(path, "it holds no models/<name>.json graph")
    allowed: set[str] = set(TEXT_MEMBERS)
    for model in models:
        allowed |= {f"models/{model}.json", f"data/sample_inputs/{model}.pt"}
        for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
            config_name = f"data/{kind}/{model}_{kind}_config.json"
            if config_name not in members:
                raise _refuse(path, f"member {root}/{config_name} is missing (torch would fall back on "
                                    "unpickling a legacy payload)")
            allowed.add(config_name)
            for payload in _payloads(path, archive, root, config_name, prefix):
                if f"data/{kind}/{payload}" not in members:
                    raise _refuse(path, f"{root}/{config_name} names a missing payload {payload!r}")
                allowed.add(f"data/{kind}/{payload}")
        _check_graph(path, _read_json(path, archive, f"{root}/models/{model}.json"), f"{root}/models/{model}.json")
    extra = sorted(set(members) - allowed)
    if extra:
        raise _refuse(path, f"member {root}/{extra[0]} is not part of a plain torch.export archive")
    for name in TEXT_MEMBERS:
        info = members.get(name)
        if info is not None:
            data = archive.read(info)
            if len(data) > TEXT_LIMIT or not data.isascii():
                raise _refuse(path, f"member {root}/{name} is not a short text field")
    for model in models:
        info = members.get(f"data/sample_inputs/{model}.pt")
        if info is not None and info.file_size:
            raise _refuse(path, f"member {info.filename} stores pickled example inputs")


def _read_json(path: Any, archive: zipfile.ZipFile, name: str) -> Any:
    info = archive.getinfo(name)
    if info.file_size > JSON_LIMIT:
        raise _refuse(path, f"member {name} is larger than {JSON_LIMIT} bytes")
    return parse_json(archive.read(info), f"{path}: member {name}", UnsafeFileError, REFUSE_HINT, max_bytes=JSON_LIMIT)


def _payloads(path: Any, archive: zipfile.ZipFile, root: str, config_name: str, prefix: str) -> Iterator[str]:
    config = _read_json(path, archive, f"{root}/{config_name}")
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(path, f"member {root}/{config_name} has no 'config' table")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _refuse(path, f"member {root}/{config_name} stores {fqn!r} as a pickle")
        name = meta.get("path_name")
        if not (isinstance(name, str) and re.fullmatch(re.escape(prefix) + r"\d+", name)):
            raise _refuse(path, f"member {root}/{config_name} stores {fqn!r} as {name!r}, not a plain tensor")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _refuse(path, f"member {root}/{config_name} gives {fqn!r} no tensor metadata")
        yield name


def _check_graph(path: Any, graph: Any, name: str) -> None:
    if not isinstance(graph, dict):
        raise _refuse(path, f"member {name} is not a serialized ExportedProgram")
    if graph.get("guards_code"):
        raise _refuse(path, f"member {name} carries guard code, which torch would compile and run")
    for key, value in _strings(graph):
        if key == "target" and not (value.startswith(ALLOWED_TARGET_PREFIXES) or value in ALLOWED_TARGETS):
            raise _refuse(path, f"member {name} calls {value!r}, which is not an ATen operator")
        if key == "expr_str" and not _safe_expression(value):
            raise _refuse(path, f"member {name} holds the symbolic expression {value[:60]!r}, outside the "
                                "grammar of shape expressions")


def _strings(node: Any, key: str | None = None) -> Iterator[tuple[str | None, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key)
    elif isinstance(node, str):
        yield key, node


def _safe_expression(expr: str) -> bool:
    """Shape arithmetic on symbols s0, u1, ... with sympy's integer functions, nothing else
    (plain `s0 + 1` or srepr form `Mul(Integer(4), Symbol('s0', positive=True))`)."""
    expr = _QUOTED_SYMBOL.sub("s0", expr)
    if not _EXPR_CHARS.match(expr) or "__" in expr:
        return False
    return all(_SYMBOL.match(ident) or ident in SYMPY_NAMES for ident in _IDENT.findall(expr))
