"""Load an exported one-pass DSNO sampler folder (see `dsno.export`).

    sampler = load_sampler("runs/x/sampler")     # form="auto": safetensors, else a program made here
    sampler.times                                 # the M output times
    sampler(x_T)                                  # [B, C, H, W] -> [B, M, c, H, W] (c = C, or an augmented
                                                  #   student's data part: c = data_channels)
    sampler.sample(n, seed=0)                     # [n, c, H, W], the last time, clamped to data_range
    sampler.num_classes                           # K for a class-conditional sampler (None: unconditional)
    sampler(x_T, labels)                          # ... which needs labels [B] long in [0, K)
    sampler.sample(n, seed=0, labels=3)           # every image class 3; or n labels (a list or LongTensor)

Loading never runs code from the folder. Every file is checked against the folder's signed
checksums.json (a changed file or a link is refused by name) before config.json is read; the
config is bounded in size and nesting, then every field (`dsno.nn.SamplerConfig`) before any
tensor is made. Weights come from safetensors (names, shapes and float dtypes checked; always
safe). A program form (sampler.pt2, sampler.onnx) is opened only when this install exported
it (its checksums carry this install's signature) or with `trust_program=True`; even then a
.pt2 must consist of plain tensors and ATen operators (`dsno.trust.check_pt2_archive`), an
.onnx may read external data only beside itself, and the program's input and output shapes
must match config.json: a class-conditional config (`num_classes`) needs a program of two inputs
(x_T, labels [B] int64), an unconditional one a program of x_T only. Needs neither Lightning nor Hydra.
"""

from __future__ import annotations

import abc
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.export.passes import move_to_device_pass

from dsno.errors import UnsafeFileError, UserError, UserFileNotFoundError
from dsno.inputs import InputError, check_noise, sample_labels
from dsno.jsonfile import read_json_file
from dsno.nn import DSNO, build_dsno
from dsno.nn.config import ConfigError, SamplerConfig, as_config
from dsno.nn.temporal import set_temporal_impl
from dsno.trust import CHECKSUM_FILE, TamperedFileError, check_onnx_model, check_pt2_archive, verify_checksums
from dsno.trust.checksums import read_checksums
from dsno.trust.tensor_file import check_layout, model_layout, tensor_layout

CONFIG_FILE = "config.json"
FORM_FILES = {"safetensors": "weights.safetensors", "pt2": "sampler.pt2", "onnx": "sampler.onnx"}
PROGRAM_FORMS = ("pt2", "onnx")
MAX_SAMPLES = 10**8          # 100 million images: beyond any FID set; a typo like n=1e12 is refused
MAX_SAMPLE_ELEMENTS = 1 << 31   # floats `Sampler.sample` may return at once (8 GiB)
EXPORT_HINT = "make one with `python -m dsno.export run_dir=RUN` (writes RUN/sampler)"
TRUST_HINT = ("a program file can run code when it is loaded; load the folder's weights.safetensors "
              "instead, or pass trust_program=True (trust_program=true for python -m dsno.sample_images, "
              "eval.trust_program=true for eval.py) "
              "if you trust where it came from")


class SamplerFileError(UserError):
    """A sampler folder's config or weights are unreadable or do not fit together."""


def check_device(device: str | torch.device) -> torch.device:
    """The torch.device named `device`, when this machine has it; else InputError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a device name ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise InputError(f"device={device!r}, but this machine has {count} CUDA device(s); use "
                             f"device='cpu'{' or cuda:0 .. cuda:' + str(count - 1) if count else ''}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device={device!r}, but MPS is not available here; use device='cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device={device!r}: a sampler runs on 'cpu', 'cuda[:N]' or 'mps'")
    return dev


def check_folder(folder: str | os.PathLike) -> Path:
    """The folder, when it is a sampler folder (it holds config.json); else UserFileNotFoundError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserFileNotFoundError(f"no sampler folder at {folder}; {EXPORT_HINT}")
    if not (folder / CONFIG_FILE).is_file():
        raise UserFileNotFoundError(f"{folder} is not a sampler folder: {CONFIG_FILE} is missing; {EXPORT_HINT}")
    return folder


def read_build_config(path: str | os.PathLike, hint: str = EXPORT_HINT) -> SamplerConfig:
    """The checked build config in a JSON file (a sampler's config.json, a run's dsno_config.json):
    size-bounded before it is read, every field bounded before any tensor is made; a link is refused
    unread. SamplerFileError names the file and the key."""
    path = Path(path)
    if path.is_symlink():
        raise SamplerFileError(f"{path} is a symbolic link, and a build config is read only from a plain file "
                               f"(copy its folder with `cp -rL`); {hint}")
    config = read_json_file(path, SamplerFileError, hint, expect=dict)
    try:
        return SamplerConfig.from_dict(config)
    except ConfigError as e:
        raise SamplerFileError(f"{path}: {e}; {hint}") from None


def read_config(folder: str | os.PathLike) -> SamplerConfig:
    """The checked config.json of a sampler folder; SamplerFileError names the file and the key."""
    return read_build_config(check_folder(folder) / CONFIG_FILE)


def load_dsno(config: SamplerConfig | dict[str, Any], weights: str | os.PathLike) -> DSNO:
    """Build the DSNO of `config` and load its state dict from a safetensors file (strict).

    The weights' names, shapes and dtypes are compared with the config's model (built on the meta
    device, so a config that asks for a huge model allocates nothing) before any real build."""
    config = as_config(config)
    weights = Path(weights)
    hint = "export the sampler again"
    found = tensor_layout(weights, SamplerFileError, hint)
    try:
        with torch.device("meta"):
            expected = model_layout(build_dsno(config))
    except ValueError as e:     # an inconsistency the field bounds do not see (group counts, heads, levels)
        raise SamplerFileError(f"the config of {weights} does not build a DSNO ({e}); {hint}") from None
    check_layout(weights, found, expected, "its config.json", SamplerFileError, hint)
    model = build_dsno(config)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def load_onnx_session(path: str | os.PathLike, device: str = "cpu"):
    """An onnxruntime InferenceSession (CUDA provider when device is cuda and it is available)."""
    import onnxruntime as ort  # deferred: loads onnxruntime only when used
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), providers=providers)


def load_pt2_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """torch.export.load of an archive that `check_pt2_archive` accepts."""
    check_pt2_archive(path)
    try:
        return torch.export.load(str(path))
    except Exception as e:   # a malformed graph fails in many ways inside torch; none is ours to debug
        raise SamplerFileError(f"{path} is not a loadable torch.export program ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                               "export it again with `python -m dsno.export`") from None


class Sampler(abc.ABC):
    """Base: `times`, `config`, `num_classes`, `__call__(x_T, labels=None) -> [B, M, c, H, W]` and
    `sample(n, seed, labels=None)`; labels (class labels in [0, num_classes)) are required by a
    class-conditional sampler and refused by an unconditional one, in one InputError line."""

    form = ""

    def __init__(self, config: SamplerConfig, path: Path, device: str = "cpu"):
        self.build_config = config
        self.config: dict[str, Any] = config.to_dict()
        self.path = path
        self.device = torch.device(device)
        self.times: list[float] = list(config.times)
        self.state_shape: tuple[int, int, int] = config.state_shape
        self.data_range: tuple[float, float] = config.data_range
        self.data_channels: int = config.data_channels or self.state_shape[0]
        self.output_channels: int = config.output_channels     # C, or data_channels: the data part only
        self.num_classes: int | None = config.num_classes       # class-conditional: labels in [0, num_classes)

    @abc.abstractmethod
    def _run(self, x_T: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [B, C, H, W], labels [B] long (a conditional sampler's) -> [B, M, c, H, W]
        (c = `output_channels`)."""

    def __call__(self, x_T: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x_T [B, C, H, W] (float), labels [B] long in [0, num_classes) (or one int for every row) for a
        class-conditional sampler (None for an unconditional one) -> the M trajectory points [B, M, c, H, W]
        (float32, x_T's device): whole states (c = C), or an augmented student's data part (c = data_channels)."""
        check_noise(x_T, self.state_shape)
        labels = sample_labels(labels, self.num_classes, x_T.shape[0])
        with torch.inference_mode():
            return self._run(x_T.float(), labels).to(x_T.device)

    def sample(self, n: int, seed: int = 0, batch_size: int = 256, labels: Any = None) -> torch.Tensor:
        """n images [n, c, H, W] (CPU, float32): the last time's output, its first c = data_channels
        channels (all of them but for an augmented process), clamped to data_range.

        The noise is torch.randn(n, C, H, W) from torch.Generator().manual_seed(seed), whatever the labels.
        labels (a class-conditional sampler's, required; None for an unconditional one): an int (every
        image that class) or n labels in [0, num_classes) (a sequence or LongTensor [n]).
        """
        per_image = math.prod(self.state_shape)
        most = min(MAX_SAMPLES, MAX_SAMPLE_ELEMENTS // per_image)
        if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= most
                and isinstance(batch_size, int) and batch_size >= 1):
            raise InputError(f"need an int n in [0, {most:,}] (the images are held in memory; write more with "
                             f"`python -m dsno.sample_images`) and batch_size >= 1, got n={n!r}, "
                             f"batch_size={batch_size!r}")
        labels = sample_labels(labels, self.num_classes, n)
        noise = torch.randn(n, *self.state_shape, generator=torch.Generator().manual_seed(seed))
        c = self.data_channels
        out = []
        for i in range(0, n, batch_size):
            batch_labels = None if labels is None else labels[i:i + batch_size]
            out.append(self(noise[i:i + batch_size].to(self.device), batch_labels)[:, -1, :c].cpu())
        images = torch.cat(out) if out else noise[:, :c]
        return images.clamp(*self.data_range)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, times={self.times})"


class TorchSampler(Sampler):
    """The DSNO module rebuilt from config.json with weights.safetensors."""

    form = "safetensors"

    def __init__(self, config: SamplerConfig, path: Path, device: str = "cpu"):
        super().__init__(config, path, device)
        self.model = load_dsno(config, path / FORM_FILES[self.form]).to(self.device)
        set_temporal_impl(self.model, "auto")      # the same map, as a matrix on the CPU (faster there)

    def _run(self, x_T: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x_T.to(self.device), None if labels is None else labels.to(self.device))


class ProgramSampler(Sampler):
    """A sampler whose network is a program file; its inputs are checked and its signature probed at load time."""

    def input_description(self) -> str:
        """The inputs config.json declares: x_T [B, C, H, W], and labels [B] for a class-conditional sampler."""
        x_T = f"x_T [B, {', '.join(map(str, self.state_shape))}]"
        return x_T if self.num_classes is None else f"{x_T} and labels [B] int64 ({self.num_classes} classes)"

    def check_input_count(self, found: int) -> None:
        """SamplerFileError unless the program takes the inputs config.json declares (1, or 2 with labels)."""
        expected = 1 if self.num_classes is None else 2
        if found != expected:
            kind = "an unconditional" if self.num_classes is None else "a class-conditional"
            raise SamplerFileError(f"{self.path / FORM_FILES[self.form]} takes {found} input(s), but its config.json "
                                   f"declares {kind} sampler, which takes {self.input_description()}; the program "
                                   "and its config do not belong together: export the sampler again")

    def check_signature(self) -> None:
        """Run a batch of 2 zero images (with labels 0 for a class-conditional sampler); the output must
        be finite [2, M, C, H, W] (else refused)."""
        file = self.path / FORM_FILES[self.form]
        expected = (2, len(self.times), self.output_channels, *self.state_shape[1:])
        labels = None if self.num_classes is None else torch.zeros(2, dtype=torch.long)
        try:
            with torch.inference_mode():
                out = self._run(torch.zeros(2, *self.state_shape), labels)
        except Exception as e:   # a foreign program may fail in any way; say which file and why
            raise SamplerFileError(f"{file} does not run on a batch of 2 of {self.input_description()} as "
                                   f"config.json declares ({type(e).__name__}); export the sampler again") \
                from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SamplerFileError(f"{file} maps [2, {', '.join(map(str, self.state_shape))}] to {got}, but "
                                   f"config.json declares [B, M={len(self.times)}, c, H, W] = {expected}; "
                                   "the program and its config do not belong together")
        if not torch.isfinite(out).all():
            raise SamplerFileError(f"{file} returns non-finite values on zero noise; export the sampler again")


class ExportedProgramSampler(ProgramSampler):
    """The torch.export program sampler.pt2 (an allow-listed archive: plain tensors, ATen ops)."""

    form = "pt2"

    def __init__(self, config: SamplerConfig, path: Path, device: str = "cpu"):
        super().__init__(config, path, device)
        program = load_pt2_program(path / FORM_FILES[self.form])
        if self.device.type != "cpu":
            program = move_to_device_pass(program, self.device)
        self.check_input_count(len(program.graph_signature.user_inputs))
        self.module = program.module()

    def _run(self, x_T: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        args = (x_T,) if labels is None else (x_T, labels)
        return self.module(*(a.to(self.device) for a in args))


class OnnxSampler(ProgramSampler):
    """The ONNX graph sampler.onnx run by onnxruntime (external data only beside it)."""

    form = "onnx"

    def __init__(self, config: SamplerConfig, path: Path, device: str = "cpu"):
        super().__init__(config, path, device)
        file = path / FORM_FILES[self.form]
        listed = read_checksums(path)["files"]
        for name in check_onnx_model(file):
            if name not in listed:
                raise UnsafeFileError(f"{file} reads external data from {path / name}, which {CHECKSUM_FILE} "
                                      "does not list; export the sampler again")
        try:
            self.session = load_onnx_session(file, device)
        except Exception as e:   # onnxruntime raises its own exception types for malformed graphs
            raise SamplerFileError(f"{file} is not a loadable ONNX model ({type(e).__name__}); export it again") \
                from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.check_input_count(len(inputs))
        labels_fit = self.num_classes is None or (len(inputs[1].shape) == 1 and inputs[1].type == "tensor(int64)")
        if len(outputs) < 1 or len(inputs[0].shape) != 4 or len(outputs[0].shape) != 5 or not labels_fit:
            raise SamplerFileError(f"{file} must take {self.input_description()} and return [B, M, C, H, W]; it "
                                   f"takes {[(tuple(i.shape), i.type) for i in inputs]}")
        self.input_name = inputs[0].name
        self.label_input_name = inputs[1].name if self.num_classes is not None else None

    def _run(self, x_T: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        feed = {self.input_name: x_T.detach().cpu().numpy()}
        if labels is not None:
            feed[self.label_input_name] = labels.detach().cpu().numpy()
        out = self.session.run(None, feed)[0]
        return torch.from_numpy(out)


SAMPLERS: dict[str, type[Sampler]] = {cls.form: cls for cls in (TorchSampler, ExportedProgramSampler, OnnxSampler)}


def resolve_form(folder: str | os.PathLike, form: str = "auto", programs_allowed: bool = True) -> str:
    """The form load_sampler would use: `form` itself, or for "auto" safetensors when present,
    else the first program form present (only when `programs_allowed`)."""
    folder = Path(folder)
    if form == "auto":
        present = [name for name, file in FORM_FILES.items() if (folder / file).is_file()]
        if "safetensors" in present or (present and programs_allowed):
            return present[0]
        if present:
            raise UnsafeFileError(f"{folder} has no weights.safetensors, and its {FORM_FILES[present[0]]} was not "
                                  f"exported by this dsno install; {TRUST_HINT}")
        raise UserFileNotFoundError(f"{folder} holds none of {list(FORM_FILES.values())}; {EXPORT_HINT}")
    if form not in FORM_FILES:
        raise UserError(f"form must be 'auto' or one of {list(FORM_FILES)}, got {form!r}")
    if not (folder / FORM_FILES[form]).is_file():
        present = [name for name, file in FORM_FILES.items() if (folder / file).is_file()]
        raise UserFileNotFoundError(f"{folder / FORM_FILES[form]} is missing (form {form!r}); this folder has "
                                    f"{present}; export it with `python -m dsno.export run_dir=RUN forms=[{form}]`")
    if form in PROGRAM_FORMS and not programs_allowed:
        raise UnsafeFileError(f"{folder / FORM_FILES[form]} was not exported by this dsno install (its "
                              f"checksums.json is not signed here); {TRUST_HINT}")
    return form


def load_sampler(path: str | os.PathLike, form: str = "auto", device: str = "cpu",
                 trust_program: bool = False) -> Sampler:
    """Load an exported sampler folder.

    form: "auto" (safetensors, else a program form) or one of FORM_FILES. Every file is checked
    against checksums.json first. trust_program: open a pt2 / onnx program that another install
    exported (programs made here are always allowed; safetensors needs no trust)."""
    folder = check_folder(path)
    check_device(device)
    made_here = verify_checksums(folder, required=[CONFIG_FILE])    # links and hashes first: nothing unchecked is read
    config = read_config(folder)
    chosen = resolve_form(folder, form, programs_allowed=made_here or bool(trust_program))
    if FORM_FILES[chosen] not in read_checksums(folder)["files"]:
        raise TamperedFileError(f"{folder / FORM_FILES[chosen]} is not listed in {folder / CHECKSUM_FILE}; "
                                "re-export the folder")
    sampler = SAMPLERS[chosen](config, folder, device)
    if isinstance(sampler, ProgramSampler):
        sampler.check_signature()
    return sampler
