"""What a safetensors weights file holds, read from its header, checked before any tensor is loaded.

    layout = tensor_layout(path, SamplerFileError, hint)          # {name: (shape, dtype)}, header only
    check_layout(path, layout, model_layout(module), "its config.json", SamplerFileError, hint)

A file with the right names and shapes but integer tensors where the model has floats (int8
weights) would load silently, cast, and make garbage; `check_layout` refuses it by name, as it
refuses missing, unexpected and wrongly shaped tensors. Floating tensors of another precision
(float16 weights for a float32 model) are cast on load, as torch does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

Layout = dict[str, tuple[tuple[int, ...], str]]
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def tensor_layout(path: str | os.PathLike, error: type[Exception], hint: str) -> Layout:
    """{name: (shape, safetensors dtype)} of a safetensors file, from its header only; `error`
    naming the file when it is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path} is not a readable safetensors file ({e}); {hint}") from None


def model_layout(module: torch.nn.Module) -> Layout:
    """The layout a module's state dict would have in a safetensors file (works on the meta device)."""
    return {k: (tuple(v.shape), _SAFETENSORS_DTYPE.get(v.dtype, str(v.dtype))) for k, v in module.state_dict().items()}


def shape_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                   limit: int = 3) -> str | None:
    """How the tensors `found` ({name: shape}) differ from `expected`: "missing [...], unexpected [...],
    wrong shape ['name: found shape vs expected shape', ...]" with the first `limit` of each; None when
    names and shapes agree."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or extra or wrong):
        return None
    shapes = [f"{k}: {tuple(found[k])} vs {tuple(expected[k])}" for k in wrong[:limit]]
    return f"missing {missing[:limit]}, unexpected {extra[:limit]}, wrong shape {shapes}"


def check_layout(path: str | os.PathLike, found: Layout, expected: Mapping[str, tuple[tuple[int, ...], str]],
                 what: str, error: type[Exception], hint: str) -> None:
    """Refuse (one `error` line naming the file, `what` it must fit and the first offending tensors) a
    file whose tensor names or shapes differ from `expected`, or with a non-float where a float is expected."""
    detail = shape_mismatch({k: v[0] for k, v in expected.items()}, {k: v[0] for k, v in found.items()})
    if detail:
        raise error(f"{Path(path)} does not fit {what}: {detail}; {hint}")
    check_float_dtypes(path, found, expected, error, hint)


def check_float_dtypes(path: str | os.PathLike, found: Layout, expected: Mapping[str, tuple] | None,
                       error: type[Exception], hint: str) -> None:
    """Every tensor of `found` must be floating (F16, BF16, F32 or F64) where the model's (`expected`)
    is; with expected=None every tensor must be."""
    bad = sorted(k for k, (_, dtype) in found.items() if dtype not in FLOAT_DTYPES
                 and (expected is None or (k in expected and expected[k][1] in FLOAT_DTYPES)))
    if bad:
        raise error(f"{Path(path)} holds {found[bad[0]][1]} tensors where the model has floats "
                    f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); {hint}")


def load_float_tensors(path: str | os.PathLike, floats: Iterable[str], error: type[Exception],
                       hint: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, once its header shows the tensors named `floats` (a
    mixture's means, variances, weights) floating; nothing is loaded before."""
    check_float_dtypes(path, tensor_layout(path, error, hint), {k: ((), "F64") for k in floats}, error, hint)
    return load_file(str(path))
