"""Check an ONNX model file before onnxruntime opens it.

ONNX runs no Python, but a tensor may keep its bytes in an external file named by a path, and
onnxruntime reads that path: `../../home/user/.ssh/id_rsa` or `/etc/shadow` would read files
outside the folder. `check_onnx_model` allows external data only in plain files beside the
model (no directories, no links) and only the standard operator domains or functions the file
itself defines.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

from google.protobuf.message import DecodeError

from dsno.errors import UnsafeFileError

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_onnx_model(path: str | os.PathLike) -> list[str]:
    """Raise UnsafeFileError on an unsafe model; return the external data file names it uses."""
    import onnx  # deferred: loads onnx only when used
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        raise UnsafeFileError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); "
                              "export it again with `python -m dsno.export`") from None
    local = {(f.domain, f.name) for f in model.functions}
    local_domains = {domain for domain, _ in local}
    externals: set[str] = set()
    for graph in _graphs(model):
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS and node.domain not in local_domains:
                raise UnsafeFileError(f"{path}: node {node.name or node.op_type!r} uses the operator domain "
                                      f"{node.domain!r}, which neither ONNX nor this file defines; refusing it")
        for tensor in _tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                externals.add(_external_location(path, tensor))
    return sorted(externals)


def _external_location(path: Path, tensor: Any) -> str:
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not _PLAIN_NAME.match(location) or location in (".", ".."):
        raise UnsafeFileError(f"{path}: tensor {tensor.name!r} reads external data from {location!r}; only a "
                              "plain file name beside the model is allowed (no directories, no absolute paths)")
    file = path.parent / location
    if file.is_symlink() or not file.is_file():
        raise UnsafeFileError(f"{path}: tensor {tensor.name!r} reads external data from {file}, which is "
                              "missing or not a regular file")
    for key in ("offset", "length"):
        if key in info and not info[key].isdigit():
            raise UnsafeFileError(f"{path}: tensor {tensor.name!r} has a bad external data {key} {info[key]!r}")
    return location


def _graphs(model: Any) -> Iterator[Any]:
    """The main graph, every subgraph of a node attribute, and every local function's body."""
    stack = [model.graph]
    for function in model.functions:
        stack.append(function)
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _tensors(graph: Any) -> Iterator[Any]:
    """Initializers (dense and sparse) and tensor-valued node attributes of one graph or function."""
    yield from getattr(graph, "initializer", ())
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
