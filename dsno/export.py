"""Export a trained DSNO as a one-pass sampler folder.

The folder holds `config.json` (the build config, see `dsno.nn.validate_config`) and one
file per form: `weights.safetensors` (the DSNO state dict), `sampler.pt2` (torch.export
program, dynamic batch) and `sampler.onnx` (opset 18, dynamic batch), and `checksums.json`:
the sha256 of every file, signed with this install's key (`dsno.trust.checksums`), so a changed
file is refused by name and the program forms load here without `trust_program`. The pt2 and
ONNX forms use `DSNO.exportable()`, which replaces the FFT of every temporal layer by the
equivalent real matrix product; every exported form is checked against the in-memory model,
through the same safe loaders users get, before the folder is published. The folder appears
atomically: written under a temporary name, then renamed.

CLI (OmegaConf dotlist, like the Hydra entry points):
    python -m dsno.export run_dir=PATH [forms=[safetensors,pt2,onnx]] [out=PATH/sampler]
reads PATH/checkpoints/dsno_ema.safetensors and PATH/checkpoints/dsno_config.json.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from dsno.atomic import disk_full_error
from dsno.errors import UserError, UserFileNotFoundError, report_errors
from dsno.nn import CONFIG_FORMAT_VERSION, DSNO, build_dsno, validate_config
from dsno.sampler import (CONFIG_FILE, FORM_FILES, SamplerFileError, load_dsno, load_onnx_session,
                          load_pt2_program, read_config)
from dsno.trust import check_onnx_model, check_pt2_archive, write_checksums

ONNX_OPSET = 18
ONNX_INPUT, ONNX_OUTPUT = "x_T", "trajectory"
ONNX_SINGLE_FILE_LIMIT = 1_800_000_000  # bytes of weights; larger models keep them in sampler.onnx.data
VERIFY_TOLERANCE = 1e-4


def export_sampler(model: DSNO, config: dict[str, Any], out_dir: str | os.PathLike,
                   forms: Sequence[str] = ("safetensors", "pt2", "onnx"), verify: bool = True) -> Path:
    """Write the sampler folder `out_dir` (replacing an existing one) and return its path.

    model: the DSNO to export (EMA weights); config: its build config (must rebuild the same
    module: same parameter names and shapes, same times). forms: any of "safetensors", "pt2", "onnx".
    verify: check each exported form against the model on a random batch (float32, CPU).
    """
    forms = _check_forms(forms)
    config = {**validate_config(dict(config)), "format_version": CONFIG_FORMAT_VERSION}
    _check_model_matches_config(model, config)
    model = copy.deepcopy(model).to("cpu").eval()

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        example = torch.randn(2, *config["image_shape"], generator=torch.Generator().manual_seed(0))
        program = export_program(model, example) if {"pt2", "onnx"} & set(forms) else None
        for form in forms:
            path = tmp / FORM_FILES[form]
            if form == "safetensors":
                save_safetensors(model, path)
            elif form == "pt2":
                save_pt2(program, path)
            else:
                save_onnx(program, example, path)
        extra = check_onnx_model(tmp / FORM_FILES["onnx"]) if "onnx" in forms else []
        write_checksums(tmp, [CONFIG_FILE, *(FORM_FILES[f] for f in forms), *extra])
        if verify:
            _verify(model, tmp, forms, config["image_shape"])
        _publish(tmp, out_dir)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(out_dir) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def save_safetensors(model: DSNO, path: Path) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "dsno_format_version": str(CONFIG_FORMAT_VERSION)})


def export_program(model: DSNO, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export of `model.exportable()` (eval, CPU) with a dynamic batch; example: [B, C, H, W]."""
    exportable = model.exportable().to("cpu").eval()
    try:
        return torch.export.export(exportable, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"torch.export cannot trace this DSNO with a dynamic batch ({reason}); the pt2 and "
                           "onnx forms need it, the safetensors form does not: export with forms=safetensors") from err


def save_pt2(program: torch.export.ExportedProgram, path: Path) -> None:
    """Save without example inputs, so the archive holds no pickled payload."""
    program = copy.copy(program)
    program.example_inputs = None
    torch.export.save(program, str(path))
    check_pt2_archive(path)


def save_onnx(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
    """ONNX (opset 18) from the exported program; input "x_T" and output "trajectory" [batch, ...]."""
    import onnx_ir as ir
    weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    onnx_program = torch.onnx.export(program, (example,), None, dynamo=True, opset_version=ONNX_OPSET,
                                     input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], verbose=False)
    graph = onnx_program.model.graph
    batch = graph.inputs[0].shape[0]
    for value in (*graph.inputs, *graph.outputs):
        value.shape = ir.Shape(["batch" if dim == batch else dim for dim in value.shape])
    onnx_program.save(str(path), external_data=weight_bytes > ONNX_SINGLE_FILE_LIMIT)


def _check_forms(forms: Sequence[str]) -> list[str]:
    forms = [forms] if isinstance(forms, str) else list(forms)
    bad = [f for f in forms if f not in FORM_FILES]
    if bad or not forms:
        raise UserError(f"forms must be a non-empty subset of {list(FORM_FILES)}, got {forms}")
    return list(dict.fromkeys(forms))


def _check_model_matches_config(model: DSNO, config: dict[str, Any]) -> None:
    expected = {k: tuple(v.shape) for k, v in build_dsno(config).state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != actual:
        missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
        wrong = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
        raise ValueError(f"the model does not match its config: missing {missing[:5]}, unexpected {extra[:5]}, "
                         f"wrong shape {wrong[:5]}")
    if model.times.tolist() != torch.tensor(config["times"], dtype=torch.float32).tolist():
        raise ValueError(f"model times {model.times.tolist()} differ from config times {config['times']}")


def _verify(model: DSNO, folder: Path, forms: Sequence[str], image_shape: Sequence[int]) -> None:
    x = torch.randn(3, *image_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    for form in forms:
        if form == "safetensors":
            with torch.no_grad():
                got = load_dsno(read_config(folder), folder / FORM_FILES[form])(x)
        elif form == "pt2":
            with torch.no_grad():
                got = load_pt2_program(folder / FORM_FILES[form]).module()(x)
        else:
            session = load_onnx_session(folder / FORM_FILES[form])
            got = torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0])
        err = float((got - reference).abs().max())
        if not err <= VERIFY_TOLERANCE * (1.0 + float(reference.abs().max())):
            raise RuntimeError(f"exported form {form!r} differs from the model by {err:.3g} (max abs)")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an existing out_dir is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------------------
# CLI

CHECKPOINT_WEIGHTS = "checkpoints/dsno_ema.safetensors"
CHECKPOINT_CONFIG = "checkpoints/dsno_config.json"


@dataclass
class ExportOptions:
    """`python -m dsno.export` options. forms: a list, or one comma-separated string."""

    run_dir: str = "???"
    forms: Any = field(default_factory=lambda: ["safetensors", "pt2", "onnx"])
    out: Optional[str] = None


def parse_options(schema: type, argv: Sequence[str], usage: str) -> Any:
    """Parse `key=value` arguments (OmegaConf dotlist syntax) into the dataclass `schema`;
    a wrong key, a wrong type or a missing value is a UserError naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    if any(a in ("-h", "--help") for a in argv):
        raise SystemExit(usage)
    argv = [a for a in argv if a != "--debug"]
    try:
        bad = next((a for a in argv if "=" not in a), None)
        if bad is not None:
            raise UserError(f"bad argument {bad!r}: expected key=value; {usage}")
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(list(argv)))
        missing = sorted(k for k in merged if OmegaConf.is_missing(merged, k))
        if missing:
            raise UserError(f"missing argument {missing[0]}=...; {usage}")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise UserError(f"argument {key}: {str(e).splitlines()[0]}; {usage}") from None


def export_run(run_dir: str | os.PathLike, forms: Sequence[str] = ("safetensors", "pt2", "onnx"),
               out: str | os.PathLike | None = None) -> Path:
    """Export the EMA DSNO of a training run to `run_dir/sampler` (or `out`)."""
    run_dir = Path(run_dir)
    for rel in (CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS):
        if not (run_dir / rel).is_file():
            raise UserFileNotFoundError(f"missing {run_dir / rel}: the training stage writes it "
                                        "(`python train.py experiment=...`; run_dir= is that run's directory)")
    path = run_dir / CHECKPOINT_CONFIG
    try:
        config = validate_config(json.loads(path.read_text()))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
        raise SamplerFileError(f"{path}: {e}; train again or point run_dir= at another run") from None
    model = load_dsno(config, run_dir / CHECKPOINT_WEIGHTS)
    return export_sampler(model, config, Path(out) if out else run_dir / "sampler", forms)


def main(argv: Sequence[str] | None = None) -> None:
    usage = "usage: python -m dsno.export run_dir=PATH [forms=[safetensors,pt2,onnx]] [out=PATH/sampler]"
    with report_errors("the checkpoint is kept and no sampler file is half-written; the same command exports again"):
        opts = parse_options(ExportOptions, sys.argv[1:] if argv is None else argv, usage)
        forms = opts.forms.split(",") if isinstance(opts.forms, str) else list(opts.forms)
        out = export_run(opts.run_dir, [str(f).strip() for f in forms if str(f).strip()], opts.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
