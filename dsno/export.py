"""Export a trained DSNO as a one-pass sampler folder.

The folder holds `config.json` (the build config, `dsno.nn.SamplerConfig.to_dict()`) and one
file per form: `weights.safetensors` (the DSNO state dict), `sampler.pt2` (torch.export
program, dynamic batch) and `sampler.onnx` (opset 18, dynamic batch), and `checksums.json`:
the sha256 of every file, signed with this install's key (`dsno.trust.checksums`), so a changed
file is refused by name and the program forms load here without `trust_program`. The pt2 and
ONNX forms use `DSNO.exportable()`, which replaces the FFT of every temporal layer by the
equivalent real matrix product. The programs take x_T [B, C, H, W] (float32), and for a
class-conditional config (`num_classes`) a second input `labels` [B] (int64); an unconditional
program has the one input only. Every exported form is checked against the in-memory model, on the
same noise and labels,
through the same safe loaders users get, before the folder is published. The folder appears
atomically: written under a temporary name (`.NAME.tmp-PID`, removed on the next export once its
process is dead), then renamed. An existing `out_dir` is replaced only when it is empty or a sampler
folder (no other files); a link there, a folder holding other files or one that cannot be written
is refused in one line before any work.

CLI (OmegaConf dotlist, like the Hydra entry points):
    python -m dsno.export run_dir=PATH [forms=[safetensors,pt2,onnx]] [out=PATH/sampler]
reads PATH/checkpoints/dsno_ema.safetensors and PATH/checkpoints/dsno_config.json.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save

from dsno.atomic import (check_room, claim_output_folder, disk_full_error, is_disk_full, refuse_link,
                         write_bytes_no_follow)
from dsno.data.lock import pid_alive
from dsno.errors import UserError, UserFileNotFoundError, report_errors
from dsno.nn import CONFIG_FORMAT_VERSION, DSNO, build_dsno
from dsno.nn.config import SamplerConfig, as_config
from dsno.run_files import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS
from dsno.sampler import (CONFIG_FILE, FORM_FILES, load_dsno, load_onnx_session, load_pt2_program,
                          read_build_config, read_config)
from dsno.trust import CHECKSUM_FILE, check_onnx_model, check_pt2_archive, write_checksums
from dsno.trust.tensor_file import shape_mismatch

ONNX_OPSET = 18
ONNX_INPUT, ONNX_LABELS, ONNX_OUTPUT = "x_T", "labels", "trajectory"
ONNX_SINGLE_FILE_LIMIT = 1_800_000_000  # bytes of weights; larger models keep them in sampler.onnx.data
VERIFY_TOLERANCE = 1e-4


def export_sampler(model: DSNO, config: SamplerConfig | dict[str, Any], out_dir: str | os.PathLike,
                   forms: Sequence[str] = ("safetensors", "pt2", "onnx"), verify: bool = True) -> Path:
    """Write the sampler folder `out_dir` (replacing an existing one) and return its path.

    model: the DSNO to export (EMA weights); config: its build config (`SamplerConfig` or its JSON
    dict; must rebuild the same module: same parameter names and shapes, same times).
    forms: any of "safetensors", "pt2", "onnx".
    verify: check each exported form against the model on a random batch (float32, CPU).
    """
    forms = _check_forms(forms)
    config = dataclasses.replace(as_config(config), format_version=CONFIG_FORMAT_VERSION)
    _check_model_matches_config(model, config)
    model = copy.deepcopy(model).to("cpu").eval()

    out_dir = claim_output_folder(out_dir, "out", not_sampler_files, create=False)
    remove_stale_temp_folders(out_dir)
    tmp = _temp_folder(out_dir, "tmp", os.getpid())
    refuse_link(tmp)
    shutil.rmtree(tmp, ignore_errors=True)  # this pid's own, from an earlier call in this process
    tmp.mkdir()
    try:
        write_bytes_no_follow(tmp / CONFIG_FILE, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
        example = example_inputs(config, 2, seed=0)
        program = export_program(model, *example) if {"pt2", "onnx"} & set(forms) else None
        for form in forms:
            path = tmp / FORM_FILES[form]
            if form == "safetensors":
                save_safetensors(model, path)
            elif form == "pt2":
                save_pt2(program, path)
            else:
                save_onnx(program, example[0], path, *example[1:])
        extra = check_onnx_model(tmp / FORM_FILES["onnx"]) if "onnx" in forms else []
        write_checksums(tmp, [CONFIG_FILE, *(FORM_FILES[f] for f in forms), *extra])
        if verify:
            _verify(model, tmp, forms, config)
        _publish(tmp, out_dir)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(out_dir, e) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def not_sampler_files(folder: Path) -> list[str]:
    """The entries of `folder` that make it other than a sampler folder export wrote (which holds
    config.json, checksums.json and form files only, ONNX external data included); [] for one."""
    names = os.listdir(folder)
    other = [n for n in names if n not in (CONFIG_FILE, CHECKSUM_FILE, *FORM_FILES.values())
             and not n.startswith(FORM_FILES["onnx"] + ".")]
    return other or ([] if not names or {CONFIG_FILE, CHECKSUM_FILE} <= set(names) else names)


def _temp_folder(out_dir: Path, kind: str, pid: int) -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{pid}"


def remove_stale_temp_folders(out_dir: Path) -> list[Path]:
    """Remove the `.NAME.tmp-PID` / `.NAME.old-PID` folders beside `out_dir` whose process is dead (a
    killed export's); a live process's, and links, are kept. Returns the removed ones."""
    removed = []
    for kind in ("tmp", "old"):
        for path in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[1]
            if pid.isdigit() and not pid_alive(int(pid)) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def save_safetensors(model: DSNO, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "dsno_format_version": str(CONFIG_FORMAT_VERSION)}
    write_bytes_no_follow(path, save(state, metadata=metadata))


def example_inputs(config: SamplerConfig, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(x_T [batch, C, H, W] float32,) and, for a class-conditional config, labels [batch] int64 in
    [0, num_classes), drawn from torch.Generator().manual_seed(seed): what the programs take."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, *config.state_shape, generator=g)
    if config.num_classes is None:
        return (x_T,)
    return x_T, torch.randint(0, config.num_classes, (batch,), generator=g)


def export_program(model: DSNO, example: torch.Tensor, labels: torch.Tensor | None = None
                   ) -> torch.export.ExportedProgram:
    """torch.export of `model.exportable()` (eval, CPU) with a dynamic batch; example: [B, C, H, W],
    labels: [B] int64 for a class-conditional model (a second input, sharing the batch), else None."""
    exportable = model.exportable().to("cpu").eval()
    batch = torch.export.Dim("batch", min=1)
    if labels is None:
        args, options = (example,), {}
    else:   # the batch equality of the two inputs as an ATen assert in the graph, not as guard code
        args, options = (example, labels), {"prefer_deferred_runtime_asserts_over_guards": True}
    try:
        return torch.export.export(exportable, args, dynamic_shapes=tuple({0: batch} for _ in args), **options)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"torch.export cannot trace this DSNO with a dynamic batch ({reason}); the pt2 and "
                           "onnx forms need it, the safetensors form does not: export with forms=safetensors") from err


def save_pt2(program: torch.export.ExportedProgram, path: Path) -> None:
    """Save without example inputs, so the archive holds no pickled payload."""
    program = copy.copy(program)
    program.example_inputs = None
    measure = io.BytesIO()  # torch's zip writer aborts the process when a file write fails: check the room first
    torch.export.save(program, measure)
    check_room(path, len(measure.getbuffer()))
    torch.export.save(program, str(path))
    check_pt2_archive(path)


def save_onnx(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path,
              labels: torch.Tensor | None = None) -> None:
    """ONNX (opset 18) from the exported program: inputs "x_T" (and "labels" [batch] int64 for a
    class-conditional program), output "trajectory" [batch, ...]."""
    import onnx_ir as ir  # deferred: loads onnx only when used
    weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    args, names = ((example,), [ONNX_INPUT]) if labels is None else ((example, labels), [ONNX_INPUT, ONNX_LABELS])
    onnx_program = torch.onnx.export(program, args, None, dynamo=True, opset_version=ONNX_OPSET,
                                     input_names=names, output_names=[ONNX_OUTPUT], verbose=False)
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


def _check_model_matches_config(model: DSNO, config: SamplerConfig) -> None:
    expected = {k: tuple(v.shape) for k, v in build_dsno(config).state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    detail = shape_mismatch(expected, actual, limit=5)
    if detail:
        raise ValueError(f"the model does not match its config: {detail}")
    if model.times.tolist() != torch.tensor(config.times, dtype=torch.float32).tolist():
        raise ValueError(f"model times {model.times.tolist()} differ from config times {list(config.times)}")


def _verify(model: DSNO, folder: Path, forms: Sequence[str], config: SamplerConfig) -> None:
    """Every form, run on the same noise (and labels), must give the model's output to VERIFY_TOLERANCE."""
    inputs = example_inputs(config, 3, seed=1)
    with torch.no_grad():
        reference = model(*inputs)
    for form in forms:
        if form == "safetensors":
            with torch.no_grad():
                got = load_dsno(read_config(folder), folder / FORM_FILES[form])(*inputs)
        elif form == "pt2":
            with torch.no_grad():
                got = load_pt2_program(folder / FORM_FILES[form]).module()(*inputs)
        else:
            session = load_onnx_session(folder / FORM_FILES[form])
            feed = dict(zip((ONNX_INPUT, ONNX_LABELS), (a.numpy() for a in inputs)))
            got = torch.from_numpy(session.run([ONNX_OUTPUT], feed)[0])
        err = float((got - reference).abs().max())
        if not err <= VERIFY_TOLERANCE * (1.0 + float(reference.abs().max())):
            raise RuntimeError(f"exported form {form!r} differs from the model by {err:.3g} (max abs)")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an existing out_dir is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = _temp_folder(out_dir, "old", os.getpid())
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------------------
# CLI



@dataclass
class ExportOptions:
    """`python -m dsno.export` options. forms: a list, or one comma-separated string."""

    run_dir: str = "???"
    forms: Any = field(default_factory=lambda: ["safetensors", "pt2", "onnx"])
    out: Optional[str] = None


def parse_options(schema: type, argv: Sequence[str], usage: str) -> Any:
    """Parse `key=value` arguments (OmegaConf dotlist syntax) into the dataclass `schema`;
    a wrong key, a wrong type or a missing value is a UserError naming it."""
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
    config = read_build_config(run_dir / CHECKPOINT_CONFIG, "train again or point run_dir= at another run")
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
