"""Teachers from a diffusers `UNet2DModel` and its scheduler config, loaded from a local folder.

Layout of the DDPM CIFAR-10 checkpoint (google/ddpm-cifar10-32), or the same files flat:

    DIR/unet/config.json                                  DIR/config.json
    DIR/unet/diffusion_pytorch_model.safetensors (.bin)   DIR/diffusion_pytorch_model.safetensors (.bin)
    DIR/scheduler/scheduler_config.json                   DIR/scheduler_config.json

The scheduler's discrete betas become `VPSchedule.discrete(betas)` (step i at t = (i + 1) / N) and
the network is called with the step index t * N - 1. Nothing is downloaded: the folder must exist,
weights load from safetensors or from a .bin only through torch.load(weights_only=True).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dsno.nn.dsno import DiffusersUNet, diffusers_backbone_spec
from dsno.schedules import VPSchedule
from dsno.teachers.base import WrappedTeacher
from dsno.teachers.unet import weights_sha256
from dsno.config import TeacherConfig, _existing_path, _fail, check_prediction_key
from dsno.errors import UserFileNotFoundError
from dsno.teachers.registry import register_teacher

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# diffusers' DDPMScheduler defaults, used for keys a scheduler config leaves out
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                      "beta_schedule": "linear", "prediction_type": "epsilon"}

EXPECTED_LAYOUT = """expected a diffusers UNet2DModel folder, in the DDPM layout (e.g. google/ddpm-cifar10-32):
  DIR/unet/config.json
  DIR/unet/diffusion_pytorch_model.safetensors   (or diffusion_pytorch_model.bin)
  DIR/scheduler/scheduler_config.json
or flat:
  DIR/config.json
  DIR/diffusion_pytorch_model.safetensors   (or diffusion_pytorch_model.bin)
  DIR/scheduler_config.json"""


@dataclass(frozen=True)
class DiffusersFiles:
    """The files of one diffusers teacher folder."""

    unet_dir: Path
    weights: Path
    scheduler_config: Path


def locate_files(path: str | Path) -> DiffusersFiles:
    """Find the UNet config, its weights and the scheduler config under `path` (either layout)."""
    root = Path(path)
    if not root.is_dir():
        raise UserFileNotFoundError(f"diffusers teacher folder {root} does not exist; {EXPECTED_LAYOUT}")
    nested = root / "unet" / "config.json"
    unet_dir = nested.parent if nested.is_file() else root
    looked_for = [nested, root / "config.json"]
    if not (unet_dir / "config.json").is_file():
        raise UserFileNotFoundError(_missing(root, "the UNet's config.json", looked_for))
    weights = [unet_dir / name for name in WEIGHT_FILES]
    found = [w for w in weights if w.is_file()]
    if not found:
        raise UserFileNotFoundError(_missing(root, "the UNet's weights", weights))
    schedulers = [root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"]
    scheduler = next((s for s in schedulers if s.is_file()), None)
    if scheduler is None:
        raise UserFileNotFoundError(_missing(root, "the scheduler config", schedulers))
    return DiffusersFiles(unet_dir, found[0], scheduler)


def _missing(root: Path, what: str, looked_for: list[Path]) -> str:
    paths = "\n".join(f"  {p}" for p in looked_for)
    return f"{root}: {what} is missing; looked for\n{paths}\n{EXPECTED_LAYOUT}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def scheduler_betas(config: dict[str, Any]) -> np.ndarray:
    """The N discrete betas a diffusers scheduler config describes, as float64.

    They come from `diffusers.DDPMScheduler.from_config(config)`, so they are the betas the model
    was trained with (diffusers computes them in float32): beta_schedule linear, scaled_linear or
    squaredcos_cap_v2; an explicit `trained_betas` list is taken as given. Configs a VP schedule
    cannot represent are refused with the reason.
    """
    import warnings

    from diffusers import DDPMScheduler
    cfg = {**SCHEDULER_DEFAULTS, **config}
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True gives alpha_bar = 0 at the last step (infinite noise), "
                         "which a VP schedule cannot represent; use a scheduler config without it")
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float64)      # as given, not rounded to float32
    n = int(cfg["num_train_timesteps"])
    if n < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {n}")
    if cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule {cfg['beta_schedule']!r} is not supported; use one of {BETA_SCHEDULES} "
                         "or trained_betas")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = DDPMScheduler.from_config({k: cfg[k] for k in keys if k in cfg})
    return scheduler.betas.double().numpy()


def scheduler_prediction(config: dict[str, Any]) -> str:
    """dsno's prediction kind (eps / x0 / v) of a scheduler config's prediction_type."""
    kind = config.get("prediction_type", SCHEDULER_DEFAULTS["prediction_type"])
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {kind!r} is not supported; use one of {sorted(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[kind]


def _check_unet_config(config: dict[str, Any], path: Path) -> None:
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"{path} describes a {name}; a diffusers teacher needs a UNet2DModel")
    if config.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"{path}: time_embedding_type={config['time_embedding_type']!r} takes noise levels, "
                         "not DDPM step indices; only 'positional' (discrete-time) UNets are supported")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise ValueError(f"{path}: a class-conditional UNet2DModel is not supported (teachers are unconditional)")
    c_in, c_out = config.get("in_channels", 3), config.get("out_channels", 3)
    if c_in != c_out:
        raise ValueError(f"{path}: in_channels={c_in} but out_channels={c_out}; the teacher must predict "
                         "exactly one image-shaped quantity (learned-variance outputs are not supported)")
    if config.get("sample_size") is None:
        raise ValueError(f"{path}: config has no sample_size; set it to the image side the model was trained at")


class DiffusersTeacher(WrappedTeacher):
    """A diffusers `UNet2DModel` on a discrete VP schedule, called with the step index t * N - 1.

    `network` is the UNet2DModel; inputs are cast to its dtype, so solvers may call in float64.
    """

    def __init__(self, unet: torch.nn.Module, schedule: VPSchedule, prediction: str = "eps",
                 name: str = "diffusers_unet2d"):
        if schedule.kind != "discrete":
            raise ValueError(f"a diffusers teacher needs a discrete schedule (VPSchedule.discrete), got {schedule!r}")
        super().__init__(DiffusersUNet(unet), schedule, prediction, "discrete", name)
        self.time_input_spec = {"discrete": schedule.num_steps}
        self.backbone_config = diffusers_backbone_spec(unet)
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.shape = (int(unet.config.in_channels), int(h), int(w))

    @property
    def network(self) -> torch.nn.Module:
        return self.model.unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x.to(self.network.dtype), self.model_time(t).to(torch.float32)).sample

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp.update(backbone=self.backbone_config, shape=list(self.shape), time_input=self.time_input_spec,
                  weights_sha256=weights_sha256(self.network))
        return fp


def load_diffusers_teacher(path: str | Path) -> DiffusersTeacher:
    """Load a UNet2DModel and its scheduler config from a local folder (offline) as a teacher, in eval mode."""
    files = locate_files(path)
    unet_config = _read_json(files.unet_dir / "config.json")
    _check_unet_config(unet_config, files.unet_dir / "config.json")
    scheduler_config = _read_json(files.scheduler_config)
    try:
        schedule = VPSchedule.discrete(scheduler_betas(scheduler_config))
        prediction = scheduler_prediction(scheduler_config)
    except ValueError as e:
        raise ValueError(f"{files.scheduler_config}: {e}") from e

    from diffusers import UNet2DModel
    try:
        unet, info = UNet2DModel.from_pretrained(
            str(files.unet_dir), local_files_only=True, output_loading_info=True,
            use_safetensors=files.weights.suffix == ".safetensors")
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"could not load the UNet2DModel from {files.weights}: {e}. Weights load from "
                         "safetensors, or from a .bin only if torch.load(weights_only=True) accepts it "
                         "(convert other pickles to safetensors yourself, from a source you trust)") from e
    bad = {k: info[k] for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        found = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {', '.join(map(str, v[:3]))})" for k, v in bad.items())
        raise ValueError(f"{files.weights} does not fit {files.unet_dir / 'config.json'}: {found}")
    return DiffusersTeacher(unet, schedule, prediction, name=Path(path).resolve().name).eval()


@dataclass
class DiffusersTeacherConfig(TeacherConfig):
    """teacher=diffusers: a UNet2DModel and its scheduler config from a local folder (DDPM CIFAR-10
    layout: DIR/unet/config.json + weights, or config.json at the top, and scheduler/scheduler_config.json).
    The folder decides the image size and the schedule; prediction, when given, must equal the
    scheduler's prediction_type (a different value is refused, showing both)."""

    kind: str = "diffusers"
    path: Optional[str] = None      # the folder (required); nothing is downloaded
    prediction: Optional[str] = None

    def __post_init__(self) -> None:
        if self.path is None:
            _fail("teacher.path", None, "teacher=diffusers needs teacher.path=DIR (a local diffusers folder)")
        _existing_path("teacher.path", self.path, "the teacher's diffusers folder")
        check_prediction_key("teacher", self.prediction)


@register_teacher("diffusers", DiffusersTeacherConfig)
def load_config(c: DiffusersTeacherConfig) -> DiffusersTeacher:
    return load_diffusers_teacher(c.path)
