"""Teachers from a diffusers `UNet2DModel` and its scheduler config, loaded from a local folder.

Layout of the DDPM CIFAR-10 checkpoint (google/ddpm-cifar10-32), or the same files flat:

    DIR/unet/config.json                                  DIR/config.json
    DIR/unet/diffusion_pytorch_model.safetensors (.bin)   DIR/diffusion_pytorch_model.safetensors (.bin)
    DIR/scheduler/scheduler_config.json                   DIR/scheduler_config.json

The scheduler config's `_class_name` decides the process (`scheduler_process`):
- the DDPM family (`VP_SCHEDULERS`, or no `_class_name`): the discrete betas become
  `VPSchedule.discrete(betas)` (step i at t = (i + 1) / N), the network is called with the step
  index t * N - 1;
- EDM (`EDM_SCHEDULERS`): `VESchedule(sigma_min, sigma_max)`, t = sigma, and the network runs inside
  diffusers' EDM preconditioning (`EDMPreconditioning`), exposed as an x0 (denoised) prediction;
- flow matching (`FLOW_SCHEDULERS`, or a DDPM-family solver with `use_flow_sigmas=True`):
  `FlowSchedule()`, the network called at t * num_train_timesteps, predicting the velocity eps - x0
  (`flow_velocity`). `shift` / `flow_shift`, dynamic shifting and the sigma spacings only move the
  sampling grid (dsno's grids come from `dsno.timesteps`); the model input stays t * N (diffusers'
  multistep solvers round that down to an integer, FlowMatchEulerDiscreteScheduler does not; dsno
  does not round).
Any other class is refused by name. A UNet with class embeddings (`num_class_embeds`, called with
`class_labels=`) is a class-conditional teacher; whether its last embedding is a null label (trained with
label dropout: guidance possible) is not in the folder, so `teacher.null_label` states it (`class_labels`).
Only `time_embedding_type="positional"` UNets load: it is the one
embedding that takes step indices, 0.25 log sigma (negative below sigma = 1) and fractional t * N alike.
Nothing is downloaded: the folder must exist, weights load from safetensors or from a .bin only through
torch.load(weights_only=True).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dsno.checks import existing_path, fail
from dsno.errors import UserFileNotFoundError
from dsno.jsonfile import read_json_file
from dsno.nn.config import (MAX_TRAIN_TIMESTEPS, ConfigError, check_diffusers_unet_config, check_int, check_list,
                             check_number)
from dsno.nn.dsno import DiffusersUNet, diffusers_backbone_spec
from dsno.schedules import FlowSchedule, Schedule, VESchedule, VPSchedule
from dsno.schema import doc_field
from dsno.teachers.base import WrappedTeacher
from dsno.teachers.config import TeacherConfig, check_guidance_key, check_prediction_key
from dsno.teachers.registry import register_teacher
from dsno.teachers.unet import weights_sha256
from dsno.trust.tensor_file import check_float_dtypes, tensor_layout

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# diffusers' DDPMScheduler defaults, used for keys a scheduler config leaves out
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                      "beta_schedule": "linear", "prediction_type": "epsilon"}

# scheduler classes whose model is a DDPM eps / x0 / v network at discrete step indices over betas
VP_SCHEDULERS = ("DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler", "DDIMParallelScheduler",
                 "DDIMInverseScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                 "DPMSolverMultistepInverseScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
                 "DEISMultistepScheduler", "UniPCMultistepScheduler", "SASolverScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                 "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "RePaintScheduler")
# those of them that take use_flow_sigmas=True: then the model is a flow model called at sigma * N
FLOW_SIGMA_SCHEDULERS = ("DPMSolverMultistepScheduler", "DPMSolverMultistepInverseScheduler",
                         "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                         "SASolverScheduler")
FLOW_SIGMA_PREDICTIONS = {"flow_prediction": "flow_velocity", "epsilon": "eps", "sample": "x0"}
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
EDM_DEFAULTS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "prediction_type": "epsilon"}
EDM_PREDICTIONS = ("epsilon", "v_prediction")     # the two diffusers' precondition_outputs defines
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")

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
    return read_json_file(path, ConfigError, "a diffusers folder's configs are JSON objects", expect=dict)


def check_scheduler_config(config: dict[str, Any]) -> None:
    """The sizes and numbers of a scheduler config, typed and bounded before diffusers makes any tensor
    (num_train_timesteps=1e10 would allocate 40 GB of betas)."""
    n = config.get("num_train_timesteps", SCHEDULER_DEFAULTS["num_train_timesteps"])
    check_int("num_train_timesteps", n, 1, MAX_TRAIN_TIMESTEPS)
    if config.get("trained_betas") is not None:
        for beta in check_list("trained_betas", config["trained_betas"], 2, MAX_TRAIN_TIMESTEPS):
            check_number("trained_betas entries", beta, 0.0, 1.0)
    for key in ("beta_start", "beta_end"):
        if key in config:
            check_number(key, config[key], 0.0, 1.0)


def scheduler_betas(config: dict[str, Any]) -> np.ndarray:
    """The N discrete betas a diffusers scheduler config describes, as float64.

    They come from `diffusers.DDPMScheduler.from_config(config)`, so they are the betas the model
    was trained with (diffusers computes them in float32): beta_schedule linear, scaled_linear or
    squaredcos_cap_v2; an explicit `trained_betas` list is taken as given. Configs a VP schedule
    cannot represent are refused with the reason.
    """

    from diffusers import DDPMScheduler  # deferred: loads diffusers only when used
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


def scheduler_process(config: dict[str, Any]) -> str:
    """The process ("vp", "edm" or "flow") a scheduler config's `_class_name` describes.

    No `_class_name` is VP (as the DDPM configs of old); a VP-family class with use_flow_sigmas=True is
    "flow"; any other class is refused, naming it and the supported ones.
    """
    name = config.get("_class_name")
    if name is None or name in VP_SCHEDULERS:
        if config.get("use_flow_sigmas"):
            if name is not None and name not in FLOW_SIGMA_SCHEDULERS:
                raise ValueError(f"{name} has no use_flow_sigmas (diffusers ignores it there); flow sigmas come with "
                                 f"{', '.join(FLOW_SIGMA_SCHEDULERS)}")
            return "flow"
        if config.get("prediction_type") == "flow_prediction":
            raise ValueError("prediction_type 'flow_prediction' needs use_flow_sigmas=True (a flow-matching model); "
                             "without it the scheduler would read the output on a VP schedule")
        if config.get("timestep_type", "discrete") != "discrete":
            raise ValueError(f"timestep_type={config['timestep_type']!r} calls the model with 0.25 log sigma instead "
                             "of the step index; only timestep_type='discrete' VP models are supported")
        return "vp"
    if name in EDM_SCHEDULERS:
        return "edm"
    if name in FLOW_SCHEDULERS:
        if config.get("invert_sigmas"):
            raise ValueError("invert_sigmas=True (noise at t = 0) is not the x_t = (1 - t) x0 + t eps of "
                             "dsno.FlowSchedule; use a config without it")
        return "flow"
    raise ValueError(f"scheduler class {name!r} is not supported; dsno loads EDM ({', '.join(EDM_SCHEDULERS)}), "
                     f"flow matching ({', '.join(FLOW_SCHEDULERS)}, or use_flow_sigmas=True) and the DDPM family "
                     f"({', '.join(VP_SCHEDULERS)})")


def scheduler_num_train_timesteps(config: dict[str, Any]) -> int:
    """N of a flow scheduler config: the model is called at timestep t * N."""
    n = config.get("num_train_timesteps", SCHEDULER_DEFAULTS["num_train_timesteps"])
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {n!r}")
    return n


def flow_sigma_prediction(config: dict[str, Any]) -> str:
    """dsno's prediction kind of a use_flow_sigmas config (flow_prediction -> flow_velocity, eps, x0)."""
    kind = config.get("prediction_type", SCHEDULER_DEFAULTS["prediction_type"])
    if kind not in FLOW_SIGMA_PREDICTIONS:
        raise ValueError(f"prediction_type {kind!r} is not supported with use_flow_sigmas=True; use one of "
                         f"{sorted(FLOW_SIGMA_PREDICTIONS)} (v_prediction on flow sigmas is not VP's v)")
    return FLOW_SIGMA_PREDICTIONS[kind]


@dataclass(frozen=True)
class EDMPreconditioning:
    """diffusers' EDM preconditioning of a network F: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).

    sigma_data: the data's std; prediction_type: "epsilon" (c_out = +sigma sigma_data / sqrt(sigma^2 +
    sigma_data^2), EDM's F) or "v_prediction" (c_out with the opposite sign), as in
    `EDMEulerScheduler.precondition_outputs`.
    """

    sigma_data: float = 0.5
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        sd = self.sigma_data
        if isinstance(sd, bool) or not isinstance(sd, (int, float)) or not math.isfinite(sd) or sd <= 0:
            raise ValueError(f"sigma_data must be a finite number > 0, got {sd!r}")
        if self.prediction_type not in EDM_PREDICTIONS:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported by diffusers' EDM "
                             f"preconditioning; use one of {list(EDM_PREDICTIONS)}")

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_in, c_noise, c_skip, c_out) at noise levels sigma [B] > 0, float64 [B] each."""
        s = sigma.to(torch.float64)
        sd2 = float(self.sigma_data) ** 2
        norm = torch.sqrt(s**2 + sd2)
        sign = 1.0 if self.prediction_type == "epsilon" else -1.0
        return 1.0 / norm, 0.25 * torch.log(s), sd2 / (s**2 + sd2), sign * s * self.sigma_data / norm

    def to_dict(self) -> dict[str, Any]:
        return {"sigma_data": float(self.sigma_data), "prediction_type": self.prediction_type}


def edm_config(config: dict[str, Any]) -> tuple[VESchedule, EDMPreconditioning]:
    """The VE schedule and preconditioning an EDM scheduler config describes (diffusers' defaults for
    keys it leaves out)."""
    cfg = {**EDM_DEFAULTS, **config}
    return VESchedule(cfg["sigma_min"], cfg["sigma_max"]), EDMPreconditioning(cfg["sigma_data"], cfg["prediction_type"])


def _check_unet_config(config: dict[str, Any], path: Path) -> None:
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"{path} describes a {name}; a diffusers teacher needs a UNet2DModel")
    if config.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"{path}: time_embedding_type={config['time_embedding_type']!r} is not supported; dsno calls "
                         "the UNet with DDPM step indices (VP), 0.25 log sigma (EDM, negative below sigma = 1) or "
                         "t * N (flow, fractional), which only 'positional' embeds ('fourier' takes log(timestep) "
                         "and divides the output by it, 'learned' looks integer steps up in a table)")
    if config.get("class_embed_type") is not None:
        raise ValueError(f"{path}: class_embed_type={config['class_embed_type']!r} is not supported; a "
                         "class-conditional teacher needs the default class embedding (num_class_embeds, a table of "
                         "labels)")
    check_diffusers_unet_config(config, str(path))
    c_in, c_out = config.get("in_channels", 3), config.get("out_channels", 3)
    if c_in != c_out:
        raise ValueError(f"{path}: in_channels={c_in} but out_channels={c_out}; the teacher must predict "
                         "exactly one image-shaped quantity (learned-variance outputs are not supported)")
    if config.get("sample_size") is None:
        raise ValueError(f"{path}: config has no sample_size; set it to the image side the model was trained at")


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def class_labels(num_class_embeds: Optional[int], null_label: Optional[int], guidance: float, where: str
                 ) -> tuple[Optional[int], bool]:
    """(num_classes, supports_guidance) of a UNet2DModel with `num_class_embeds` class embeddings.

    The convention: the UNet says nothing about a null label, so the user states it. null_label None:
    every embedding is a class (num_classes = num_class_embeds), no unconditional branch, so no guidance.
    null_label = num_class_embeds - 1 (a UNet trained with label dropout to its last embedding): classes
    [0, num_class_embeds - 1) and that null label, so it can be guided. Anything else is refused (ValueError,
    one line): a null label on an unconditional UNet, one that is not the last embedding, guidance without one."""
    if num_class_embeds is None:
        if null_label is not None:
            raise ValueError(f"{where}: the UNet2DModel is unconditional (no num_class_embeds), so it has no null "
                             f"label: remove teacher.null_label={null_label}")
        return None, False
    last = num_class_embeds - 1
    if null_label is None:
        if guidance:
            raise ValueError(f"{where}: guidance {guidance:g} needs the UNet's unconditional branch, and which of its "
                             f"{num_class_embeds} class embeddings is the null label is not stated: set "
                             f"teacher.null_label={last} if it was trained with label dropout to its last one, else "
                             f"guidance 0")
        return num_class_embeds, False
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label != last or last < 1:
        raise ValueError(f"{where}: teacher.null_label={null_label!r}, but dsno takes the null label to be the last "
                         f"of the UNet's num_class_embeds={num_class_embeds} embeddings ({last}), with at least one "
                         f"class before it: set teacher.null_label={last}, or null for a UNet without one")
    return last, True


class _UNet2DTeacher(WrappedTeacher):
    """What every diffusers UNet2DModel teacher shares: the network, its shape, its fingerprint.

    `network` is the UNet2DModel; inputs are cast to its dtype, so solvers may call in float64.
    A UNet with class embeddings (num_class_embeds) is class-conditional: see `class_labels` for
    null_label, and `dsno.teachers.conditional` for labels and guidance.
    """

    def __init__(self, unet: torch.nn.Module, schedule: Schedule, prediction: str, time_input: str, name: str,
                 null_label: Optional[int] = None, guidance: float = 0.0):
        num_classes, guided = class_labels(getattr(unet.config, "num_class_embeds", None), null_label, guidance,
                                           f"diffusers teacher {name}")
        super().__init__(DiffusersUNet(unet), schedule, prediction, time_input, name, num_classes, guided, guidance)
        self.null_label = null_label
        self.architecture = diffusers_backbone_spec(unet)
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.shape = (int(unet.config.in_channels), int(h), int(w))

    @property
    def network(self) -> torch.nn.Module:
        return self.model.unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x.to(self.network.dtype), self.model_time(t).to(torch.float32), self.row_labels(labels, x))

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp.update(backbone=self.architecture, shape=list(self.shape), time_input=self.time_input_spec,
                  weights_sha256=weights_sha256(self.network))
        return fp


class DiffusersTeacher(_UNet2DTeacher):
    """A diffusers `UNet2DModel` on a discrete VP schedule, called with the step index t * N - 1."""

    def __init__(self, unet: torch.nn.Module, schedule: VPSchedule, prediction: str = "eps",
                 name: str = "diffusers_unet2d", null_label: Optional[int] = None, guidance: float = 0.0):
        if not isinstance(schedule, VPSchedule) or schedule.kind != "discrete":
            raise ValueError(f"a diffusers teacher needs a discrete schedule (VPSchedule.discrete), got {schedule!r}")
        super().__init__(unet, schedule, prediction, "discrete", name, null_label, guidance)
        self.time_input_spec = {"discrete": schedule.num_steps}
        self.backbone_config = self.architecture


class DiffusersEDMTeacher(_UNet2DTeacher):
    """A diffusers `UNet2DModel` trained with EDM preconditioning, on `VESchedule` (t = sigma).

    Predicts x0 = D(x; sigma) = c_skip x + c_out F(c_in x, 0.25 log sigma), exactly as diffusers'
    EDM schedulers do. No `backbone_config`: a DSNO student built from this network would need its
    preconditioning and noise-level input, which DSNO's build config does not carry.
    """

    def __init__(self, unet: torch.nn.Module, schedule: VESchedule, preconditioning: EDMPreconditioning,
                 name: str = "diffusers_unet2d_edm", null_label: Optional[int] = None, guidance: float = 0.0):
        if not isinstance(schedule, VESchedule):
            raise ValueError(f"an EDM diffusers teacher needs a VESchedule, got {schedule!r}")
        super().__init__(unet, schedule, "x0", "continuous", name, null_label, guidance)
        self.preconditioning = preconditioning
        self.time_input_spec = {"edm": preconditioning.to_dict()}

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c_in, c_noise, c_skip, c_out = self.preconditioning.coefficients(t)
        f = self.model((_bcast(c_in, x) * x).to(self.network.dtype), c_noise.to(torch.float32),
                       self.row_labels(labels, x))
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * f.to(x.dtype)


class DiffusersFlowTeacher(_UNet2DTeacher):
    """A diffusers `UNet2DModel` flow-matching model on `FlowSchedule`, called at timestep t * N.

    prediction: "flow_velocity" (u = eps - x0, FlowMatchEulerDiscreteScheduler's model output), or
    "eps" / "x0" for use_flow_sigmas configs that say so. No `backbone_config` (see DiffusersEDMTeacher).
    """

    def __init__(self, unet: torch.nn.Module, num_train_timesteps: int = 1000, prediction: str = "flow_velocity",
                 schedule: FlowSchedule | None = None, name: str = "diffusers_unet2d_flow",
                 null_label: Optional[int] = None, guidance: float = 0.0):
        schedule = FlowSchedule() if schedule is None else schedule
        if not isinstance(schedule, FlowSchedule):
            raise ValueError(f"a flow-matching diffusers teacher needs a FlowSchedule, got {schedule!r}")
        super().__init__(unet, schedule, prediction, "continuous", name, null_label, guidance)
        self.num_train_timesteps = int(num_train_timesteps)
        self.time_input_spec = {"flow": self.num_train_timesteps}

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_train_timesteps


@dataclass(frozen=True)
class SchedulerSpec:
    """What a scheduler config says about its model: process ("vp" / "edm" / "flow"), schedule,
    dsno prediction kind, and the EDM preconditioning or the flow time scale N where they apply."""

    process: str
    schedule: Schedule
    prediction: str
    preconditioning: Optional[EDMPreconditioning] = None
    num_train_timesteps: Optional[int] = None


def scheduler_spec(config: dict[str, Any]) -> SchedulerSpec:
    """Read a scheduler config (see `scheduler_process`); a config dsno cannot represent is a ValueError."""
    check_scheduler_config(config)
    process = scheduler_process(config)
    if process == "edm":
        schedule, preconditioning = edm_config(config)
        return SchedulerSpec("edm", schedule, "x0", preconditioning=preconditioning)
    if process == "flow":
        prediction = flow_sigma_prediction(config) if config.get("use_flow_sigmas") else "flow_velocity"
        n = scheduler_num_train_timesteps(config)
        return SchedulerSpec("flow", FlowSchedule(), prediction, num_train_timesteps=n)
    return SchedulerSpec("vp", VPSchedule.discrete(scheduler_betas(config)), scheduler_prediction(config))


def make_teacher(unet: torch.nn.Module, spec: SchedulerSpec, name: str, null_label: Optional[int] = None,
                 guidance: float = 0.0) -> _UNet2DTeacher:
    """The teacher of `unet` under the process of `spec` (a class-conditional UNet: see `class_labels`)."""
    cond = {"null_label": null_label, "guidance": guidance}
    if spec.process == "edm":
        return DiffusersEDMTeacher(unet, spec.schedule, spec.preconditioning, name=name, **cond)
    if spec.process == "flow":
        return DiffusersFlowTeacher(unet, spec.num_train_timesteps, spec.prediction, spec.schedule, name=name, **cond)
    return DiffusersTeacher(unet, spec.schedule, spec.prediction, name=name, **cond)


def load_diffusers_teacher(path: str | Path, null_label: Optional[int] = None, guidance: float = 0.0
                           ) -> _UNet2DTeacher:
    """Load a UNet2DModel and its scheduler config from a local folder (offline) as a teacher, in eval mode:
    a `DiffusersTeacher` (VP), `DiffusersEDMTeacher` or `DiffusersFlowTeacher`, by the scheduler class.

    A UNet with class embeddings (num_class_embeds) loads as a class-conditional teacher; null_label (None,
    or its last embedding num_class_embeds - 1) and guidance w as `class_labels` says, checked before the
    weights load (ValueError, one line)."""
    files = locate_files(path)
    unet_config = _read_json(files.unet_dir / "config.json")
    _check_unet_config(unet_config, files.unet_dir / "config.json")
    class_labels(unet_config.get("num_class_embeds"), null_label, guidance, str(files.unet_dir / "config.json"))
    scheduler_config = _read_json(files.scheduler_config)
    try:
        spec = scheduler_spec(scheduler_config)
    except ValueError as e:
        raise ValueError(f"{files.scheduler_config}: {e}") from e

    if files.weights.suffix == ".safetensors":
        hint = "the weights must be floating-point tensors"
        check_float_dtypes(files.weights, tensor_layout(files.weights, ConfigError, hint), None,
                           ConfigError, hint)
    from diffusers import UNet2DModel  # deferred: loads diffusers only when used
    from diffusers.utils import is_accelerate_available  # deferred: loads diffusers only when used
    try:     # low_cpu_mem_usage needs accelerate; asked for without it, diffusers warns on every load
        unet, info = UNet2DModel.from_pretrained(
            str(files.unet_dir), local_files_only=True, output_loading_info=True,
            use_safetensors=files.weights.suffix == ".safetensors", low_cpu_mem_usage=is_accelerate_available())
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"could not load the UNet2DModel from {files.weights}: {e}. Weights load from "
                         "safetensors, or from a .bin only if torch.load(weights_only=True) accepts it "
                         "(convert other pickles to safetensors yourself, from a source you trust)") from e
    bad = {k: info[k] for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        found = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {', '.join(map(str, v[:3]))})" for k, v in bad.items())
        raise ValueError(f"{files.weights} does not fit {files.unet_dir / 'config.json'}: {found}")
    return make_teacher(unet, spec, Path(path).resolve().name, null_label, guidance).eval()


@dataclass
class DiffusersTeacherConfig(TeacherConfig):
    """teacher=diffusers: a UNet2DModel and its scheduler config from a local folder (DDPM CIFAR-10
    layout: DIR/unet/config.json + weights, or config.json at the top, and scheduler/scheduler_config.json).
    The folder decides the image size, the process and the schedule; prediction, when given, must equal
    the teacher's (the scheduler's prediction_type; x0 for EDM, flow_velocity for flow matching; a
    different value is refused, showing both)."""

    kind: str = "diffusers"
    path: Optional[str] = doc_field(None, "the diffusers folder (required); nothing is downloaded")
    prediction: Optional[str] = doc_field(None, "when given, must equal the folder's prediction (eps, x0, v, "
                                          "flow_velocity)")
    null_label: Optional[int] = doc_field(None, "a class-conditional UNet (num_class_embeds N) trained with label "
                                                "dropout: its null label, which must be N - 1 (classes 0..N-2); "
                                                "null: all N embeddings are classes, no guidance")
    guidance: float = doc_field(0.0, "classifier-free guidance scale w >= 0 of (1 + w) f(x, t, y) - w f(x, t, null) "
                                     "(needs teacher.null_label)")

    def __post_init__(self) -> None:
        if self.path is None:
            fail("teacher.path", None, "teacher=diffusers needs teacher.path=DIR (a local diffusers folder)")
        existing_path("teacher.path", self.path, "the teacher's diffusers folder")
        check_prediction_key("teacher", self.prediction)
        check_guidance_key(self.guidance)


@register_teacher("diffusers", DiffusersTeacherConfig)
def load_config(c: DiffusersTeacherConfig) -> WrappedTeacher:
    return load_diffusers_teacher(c.path, c.null_label, c.guidance)
