"""Export a trained DSNO as a one-pass sampler folder.

The folder holds `config.json` (the build config, see `dsno.nn.validate_config`) and one
file per form: `weights.safetensors` (the DSNO state dict), `sampler.pt2` (torch.export
program, dynamic batch) and `sampler.onnx` (opset 18, dynamic batch). The pt2 and ONNX forms
use `DSNO.exportable()`, which replaces the FFT of every temporal layer by the equivalent real
matrix product; every exported form is checked against the in-memory model before the folder
is published. The folder appears atomically: written under a temporary name, then renamed.

CLI:  python -m dsno.export run_dir=PATH [forms=safetensors,pt2,onnx] [out=PATH/sampler]
reads PATH/checkpoints/dsno_ema.safetensors and PATH/checkpoints/dsno_config.json.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from dsno.nn import CONFIG_FORMAT_VERSION, DSNO, build_dsno, validate_config
from dsno.sampler import CONFIG_FILE, FORM_FILES, load_dsno, load_onnx_session, pt2_check_no_pickle

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
        if verify:
            _verify(model, tmp, forms, config["image_shape"])
        _publish(tmp, out_dir)
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
    pt2_check_no_pickle(path)


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
        raise ValueError(f"forms must be a non-empty subset of {list(FORM_FILES)}, got {forms}")
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
            config = json.loads((folder / CONFIG_FILE).read_text())
            with torch.no_grad():
                got = load_dsno(config, folder / FORM_FILES[form])(x)
        elif form == "pt2":
            with torch.no_grad():
                got = torch.export.load(str(folder / FORM_FILES[form])).module()(x)
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


def parse_key_values(argv: Sequence[str], allowed: Mapping[str, Any], required: Sequence[str],
                     usage: str) -> dict[str, str]:
    """Parse `key=value` arguments. allowed: key -> default (None: no default). Raises SystemExit."""
    args: dict[str, Any] = dict(allowed)
    for item in argv:
        key, sep, value = item.partition("=")
        if item in ("-h", "--help"):
            raise SystemExit(usage)
        if not sep or key not in allowed:
            raise SystemExit(f"bad argument {item!r}: expected key=value with key in {list(allowed)}\n{usage}")
        args[key] = value
    missing = [k for k in required if args.get(k) is None]
    if missing:
        raise SystemExit(f"missing argument(s) {', '.join(f'{k}=...' for k in missing)}\n{usage}")
    return args


def export_run(run_dir: str | os.PathLike, forms: Sequence[str] = ("safetensors", "pt2", "onnx"),
               out: str | os.PathLike | None = None) -> Path:
    """Export the EMA DSNO of a training run to `run_dir/sampler` (or `out`)."""
    run_dir = Path(run_dir)
    for rel in (CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS):
        if not (run_dir / rel).is_file():
            raise FileNotFoundError(f"missing {run_dir / rel}: the training stage writes it "
                                    "(`python train.py experiment=...`; run_dir= is that run's directory)")
    config = json.loads((run_dir / CHECKPOINT_CONFIG).read_text())
    model = load_dsno(config, run_dir / CHECKPOINT_WEIGHTS)
    return export_sampler(model, config, Path(out) if out else run_dir / "sampler", forms)


def main(argv: Sequence[str] | None = None) -> None:
    usage = "usage: python -m dsno.export run_dir=PATH [forms=safetensors,pt2,onnx] [out=PATH/sampler]"
    args = parse_key_values(sys.argv[1:] if argv is None else argv,
                            {"run_dir": None, "forms": "safetensors,pt2,onnx", "out": None}, ["run_dir"], usage)
    try:
        forms = [f.strip() for f in args["forms"].strip("[]").split(",") if f.strip()]   # a,b or Hydra's [a,b]
        out = export_run(args["run_dir"], forms, args["out"])
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
