"""Load an exported one-pass DSNO sampler folder (see `dsno.export`).

    sampler = load_sampler("runs/x/sampler")     # form="auto": safetensors, else pt2, else onnx
    sampler.times                                 # the M output times
    sampler(x_T)                                  # [B, C, H, W] -> [B, M, C, H, W]
    sampler.sample(n, seed=0)                     # [n, C, H, W], the last time, clamped to data_range

Loading is safe: weights come from safetensors; a pt2 archive is refused if it carries any
pickled payload; ONNX runs in onnxruntime. Needs neither Lightning nor Hydra.
"""

from __future__ import annotations

import abc
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from dsno.nn import CONFIG_FORMAT_VERSION, DSNO, build_dsno, validate_config

CONFIG_FILE = "config.json"
FORM_FILES = {"safetensors": "weights.safetensors", "pt2": "sampler.pt2", "onnx": "sampler.onnx"}
EXPORT_HINT = "make one with `python -m dsno.export run_dir=RUN` (writes RUN/sampler)"


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The validated config.json of a sampler folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no sampler folder at {folder}; {EXPORT_HINT}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a sampler folder: {CONFIG_FILE} is missing; {EXPORT_HINT}")
    config = json.loads(path.read_text())
    version = config.get("format_version")
    if isinstance(version, int) and version > CONFIG_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}: written by a newer dsno; upgrade "
                         f"(this one reads format_version <= {CONFIG_FORMAT_VERSION})")
    return validate_config(config)


def load_dsno(config: dict[str, Any], weights: str | os.PathLike) -> DSNO:
    """Build the DSNO of `config` and load its state dict from a safetensors file (strict)."""
    from safetensors.torch import load_file
    model = build_dsno(config)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def pt2_check_no_pickle(path: str | os.PathLike) -> None:
    """Refuse a torch.export archive that carries pickled payloads (torch.export.load unpickles them)."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if info.filename.endswith("_config.json") and "data" in parts:
                entries = json.loads(archive.read(info)).get("config", {})
                if any(meta.get("use_pickle") for meta in entries.values()):
                    raise ValueError(f"{path} stores pickled tensors; refusing to load it")
            elif "sample_inputs" in parts and info.file_size:
                raise ValueError(f"{path} stores pickled example inputs; refusing to load it "
                                 "(dsno.export writes archives without them)")
            elif "constants" in parts and not parts[-1].startswith("tensor_"):
                raise ValueError(f"{path} stores a non-tensor constant {info.filename!r}; refusing to load it")


def load_onnx_session(path: str | os.PathLike, device: str = "cpu"):
    """An onnxruntime InferenceSession (CUDA provider when device is cuda and it is available)."""
    import onnxruntime as ort
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), providers=providers)


class Sampler(abc.ABC):
    """Base: `times`, `config`, `__call__(x_T) -> [B, M, C, H, W]` and `sample(n, seed)`."""

    form = ""

    def __init__(self, config: dict[str, Any], path: Path, device: str = "cpu"):
        self.config = config
        self.path = path
        self.device = torch.device(device)
        self.times: list[float] = [float(t) for t in config["times"]]
        self.image_shape: tuple[int, int, int] = tuple(config["image_shape"])
        self.data_range: tuple[float, float] = tuple(float(v) for v in config.get("data_range", (-1.0, 1.0)))

    @abc.abstractmethod
    def _run(self, x_T: torch.Tensor) -> torch.Tensor:
        """float32 [B, C, H, W] -> [B, M, C, H, W]."""

    def __call__(self, x_T: torch.Tensor) -> torch.Tensor:
        """x_T [B, C, H, W] (float) -> the M trajectory points [B, M, C, H, W] (float32, x_T's device)."""
        if not isinstance(x_T, torch.Tensor) or x_T.ndim != 4 or tuple(x_T.shape[1:]) != self.image_shape:
            shape = tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__
            raise ValueError(f"x_T must be a tensor of shape [B, {', '.join(map(str, self.image_shape))}], "
                             f"got {shape}")
        with torch.inference_mode():
            return self._run(x_T.float()).to(x_T.device)

    def sample(self, n: int, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
        """n images [n, C, H, W] (CPU, float32): the last time's output, clamped to data_range.

        The noise is torch.randn(n, C, H, W) from torch.Generator().manual_seed(seed).
        """
        if not (isinstance(n, int) and n >= 0 and isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"need an int n >= 0 and batch_size >= 1, got n={n!r}, batch_size={batch_size!r}")
        noise = torch.randn(n, *self.image_shape, generator=torch.Generator().manual_seed(seed))
        out = [self(noise[i:i + batch_size].to(self.device))[:, -1].cpu() for i in range(0, n, batch_size)]
        images = torch.cat(out) if out else noise
        return images.clamp(*self.data_range)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, times={self.times})"


class TorchSampler(Sampler):
    """The DSNO module rebuilt from config.json with weights.safetensors."""

    form = "safetensors"

    def __init__(self, config: dict[str, Any], path: Path, device: str = "cpu"):
        super().__init__(config, path, device)
        self.model = load_dsno(config, path / FORM_FILES[self.form]).to(self.device)

    def _run(self, x_T: torch.Tensor) -> torch.Tensor:
        return self.model(x_T.to(self.device))


class ExportedProgramSampler(Sampler):
    """The torch.export program sampler.pt2 (checked to be free of pickled payloads)."""

    form = "pt2"

    def __init__(self, config: dict[str, Any], path: Path, device: str = "cpu"):
        super().__init__(config, path, device)
        file = path / FORM_FILES[self.form]
        pt2_check_no_pickle(file)
        program = torch.export.load(str(file))
        if self.device.type != "cpu":
            from torch.export.passes import move_to_device_pass
            program = move_to_device_pass(program, self.device)
        self.module = program.module()

    def _run(self, x_T: torch.Tensor) -> torch.Tensor:
        return self.module(x_T.to(self.device))


class OnnxSampler(Sampler):
    """The ONNX graph sampler.onnx run by onnxruntime."""

    form = "onnx"

    def __init__(self, config: dict[str, Any], path: Path, device: str = "cpu"):
        super().__init__(config, path, device)
        self.session = load_onnx_session(path / FORM_FILES[self.form], device)
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, x_T: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x_T.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


SAMPLERS: dict[str, type[Sampler]] = {cls.form: cls for cls in (TorchSampler, ExportedProgramSampler, OnnxSampler)}


def resolve_form(folder: str | os.PathLike, form: str = "auto") -> str:
    """The form load_sampler would use: `form` itself, or for "auto" the first file present."""
    folder = Path(folder)
    if form == "auto":
        for name, file in FORM_FILES.items():
            if (folder / file).is_file():
                return name
        raise FileNotFoundError(f"{folder} holds none of {list(FORM_FILES.values())}; {EXPORT_HINT}")
    if form not in FORM_FILES:
        raise ValueError(f"form must be 'auto' or one of {list(FORM_FILES)}, got {form!r}")
    if not (folder / FORM_FILES[form]).is_file():
        present = [name for name, file in FORM_FILES.items() if (folder / file).is_file()]
        raise FileNotFoundError(f"{folder / FORM_FILES[form]} is missing (form {form!r}); this folder has {present}; "
                                f"export it with `python -m dsno.export run_dir=RUN forms={form}`")
    return form


def load_sampler(path: str | os.PathLike, form: str = "auto", device: str = "cpu") -> Sampler:
    """Load an exported sampler folder. form: "auto" (safetensors, then pt2, then onnx) or one of them."""
    folder = Path(path)
    config = read_config(folder)
    return SAMPLERS[resolve_form(folder, form)](config, folder, device)
