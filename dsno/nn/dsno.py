"""The DSNO operator: a backbone with temporal Fourier layers that maps x_T to M trajectory points.

`DSNO(x_T)`: x_T [B, C, H, W] -> [B, M, C, H, W], branch m the prediction at time t_m.
x_T is repeated M times; the backbone runs on [B*M, C, H, W], branch m with the time input of
t_m; after every residual unit (a ResBlock and its attention block, if any) of the down path,
middle and up path, a `TemporalConv` mixes the M branches. Output m is
skip[m] * x_T + out_scale[m] * net_m, the network run on in_scale[m] * x_T at time input
net_times[m] (defaults: skip 0, out_scale 1, in_scale 1, net_times = times; the coefficients of
each output parameterisation come from `dsno.nn.parameterization`).

`build_dsno(config)` builds the operator from a JSON-serialisable config (see `validate_config`),
the format the training stage writes and the exported sampler folder carries.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from dsno.nn.temporal import TemporalConv, TemporalMatmul
from dsno.nn.unet import ResAttnBlock, UNet

CONFIG_FORMAT_VERSION = 1

UnitPredicate = Callable[[str, nn.Module], "int | None"]


class WithTemporal(nn.Module):
    """A residual unit followed by its temporal layer; passes all arguments through to the unit."""

    def __init__(self, unit: nn.Module, temporal: nn.Module):
        super().__init__()
        self.unit = unit
        self.temporal = temporal

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.temporal(self.unit(*args, **kwargs))


class DiffusersUNet(nn.Module):
    """Adapter: a diffusers `UNet2DModel` called as fn(x, t) -> tensor (its output's `.sample`)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


class DiscreteTime:
    """Time input of a discrete-time network: t in (0, 1] -> DDPM step index t * N - 1 (float)."""

    def __init__(self, num_steps: int):
        self.num_steps = int(num_steps)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_steps - 1.0

    def __repr__(self) -> str:
        return f"DiscreteTime({self.num_steps})"


def _unit_channels_ours(name: str, module: nn.Module) -> int | None:
    return module.res.conv2.out_channels if isinstance(module, ResAttnBlock) else None


def _diffusers_units(unet: nn.Module, prefix: str) -> dict[str, int]:
    """Residual units of a diffusers UNet2DModel: attentions[j] if present, else resnets[j]."""
    units: dict[str, int] = {}
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for block_name, block in blocks:
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            if attentions is not None and j < len(attentions) and attentions[j] is not None:
                units[f"{prefix}{block_name}.attentions.{j}"] = resnet.out_channels
            else:
                units[f"{prefix}{block_name}.resnets.{j}"] = resnet.out_channels
    return units


def default_is_unit(backbone: nn.Module) -> UnitPredicate:
    """The unit test for our `UNet` (ResAttnBlock) or a diffusers UNet2DModel (bare or adapted)."""
    unet = backbone.unet if isinstance(backbone, DiffusersUNet) else backbone
    if all(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        units = _diffusers_units(unet, "unet." if unet is not backbone else "")
        return lambda name, module: units.get(name)
    return _unit_channels_ours


def insert_temporal_layers(backbone: nn.Module, num_times: int, modes: int,
                           is_unit: UnitPredicate | None = None) -> list[str]:
    """Wrap every residual unit of `backbone` (in place) with a `TemporalConv`; returns their names.

    is_unit(name, module) -> the unit's output channels if `module` is a residual unit (it will
    be followed by a temporal layer), else None. Default: `default_is_unit(backbone)`.
    Units are not searched inside other units; the backbone itself is never a unit.
    """
    if any(isinstance(mod, (TemporalConv, TemporalMatmul)) for mod in backbone.modules()):
        raise ValueError(f"{type(backbone).__name__} already has temporal layers; pass the bare backbone")
    is_unit = is_unit or default_is_unit(backbone)
    found: list[tuple[str, nn.Module, int]] = []
    for name, module in backbone.named_modules():
        if not name or any(name.startswith(done + ".") for done, _, _ in found):
            continue
        channels = is_unit(name, module)
        if channels is not None:
            found.append((name, module, channels))
    if not found:
        raise ValueError(f"no residual units found in {type(backbone).__name__}; pass is_unit(name, module) "
                         "returning the unit's output channels")
    for name, module, channels in found:
        parent_name, _, attr = name.rpartition(".")
        parent = backbone.get_submodule(parent_name)
        setattr(parent, attr, WithTemporal(module, TemporalConv(channels, num_times, modes)))
    return [name for name, _, _ in found]


def _per_time(name: str, values: Sequence[float] | None, default: float, m: int) -> list[float]:
    values = [default] * m if values is None else [float(c) for c in values]
    if len(values) != m or not all(math.isfinite(c) for c in values):
        raise ValueError(f"{name} must have one finite coefficient per time ({m}), got {values}")
    return values


def _check_times(times: Sequence[float]) -> list[float]:
    times = [float(t) for t in times]
    if not times or not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in times):
        raise ValueError(f"times must be a non-empty list of numbers in [0, 1], got {times}")
    if any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be strictly decreasing (t_1 > ... > t_M), got {times}")
    return times


class DSNO(nn.Module):
    """Backbone + temporal layers: x_T [B, C, H, W] -> [B, M, C, H, W] at `times` (one pass).

    backbone: fn(x [N, C, H, W], time_input(t) [N]) -> [N, C, H, W]; modified in place
    (temporal layers inserted), so pass a copy to keep the original.
    times: the M output times t_1 > ... > t_M in [0, 1]. modes: kept Fourier modes (<= M//2 + 1).
    skip: M coefficients c_m of the output skip c_m * x_T (default zeros).
    out_scale, in_scale: M output and input scales (default ones); net_times: the M time inputs
    of the branches in [0, 1] (default `times`).
    time_input: maps the float times [N] to what the backbone takes (default identity).
    """

    def __init__(self, backbone: nn.Module, times: Sequence[float], modes: int,
                 skip: Sequence[float] | None = None,
                 time_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 is_unit: UnitPredicate | None = None, out_scale: Sequence[float] | None = None,
                 in_scale: Sequence[float] | None = None, net_times: Sequence[float] | None = None):
        super().__init__()
        times = _check_times(times)
        self.num_times = len(times)
        skip = _per_time("skip", skip, 0.0, self.num_times)
        out_scale = _per_time("out_scale", out_scale, 1.0, self.num_times)
        in_scale = _per_time("in_scale", in_scale, 1.0, self.num_times)
        net_times = times if net_times is None else _per_time("net_times", net_times, 0.0, self.num_times)
        if not all(0.0 <= t <= 1.0 for t in net_times):
            raise ValueError(f"net_times must lie in [0, 1], got {net_times}")
        self.modes = int(modes)
        self.time_input = time_input
        self.unit_names = insert_temporal_layers(backbone, self.num_times, self.modes, is_unit)
        self.backbone = backbone
        self.register_buffer("times", torch.tensor(times, dtype=torch.float32), persistent=False)
        self.register_buffer("skip", torch.tensor(skip, dtype=torch.float32), persistent=False)
        self.register_buffer("out_scale", torch.tensor(out_scale, dtype=torch.float32), persistent=False)
        self.register_buffer("in_scale", torch.tensor(in_scale, dtype=torch.float32), persistent=False)
        self.register_buffer("net_times", torch.tensor(net_times, dtype=torch.float32), persistent=False)

    def forward(self, x_T: torch.Tensor) -> torch.Tensor:
        b, m = x_T.shape[0], self.num_times
        per_time = (1, m, *([1] * (x_T.ndim - 1)))
        x = (self.in_scale.to(x_T.dtype).reshape(per_time) * x_T.unsqueeze(1)).reshape(b * m, *x_T.shape[1:])
        t = self.net_times.repeat(b)
        if self.time_input is not None:
            t = self.time_input(t)
        net = self.backbone(x, t).reshape(b, m, -1, *x_T.shape[2:])
        # a backbone with fewer output channels than inputs (an augmented student's data part) skips from
        # the leading channels of x_T
        return (self.skip.to(net.dtype).reshape(per_time) * x_T[:, :net.shape[2]].unsqueeze(1)
                + self.out_scale.to(net.dtype).reshape(per_time) * net)

    def temporal_layers(self) -> list[nn.Module]:
        return [mod for mod in self.modules() if isinstance(mod, (TemporalConv, TemporalMatmul))]

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the temporal layers (for optimizer param groups and counting)."""
        for layer in self.temporal_layers():
            yield from layer.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """All other parameters (those the student copies from the teacher)."""
        temporal = {id(p) for p in self.temporal_parameters()}
        return (p for p in self.parameters() if id(p) not in temporal)

    def exportable(self) -> "DSNO":
        """A deep copy with every TemporalConv replaced by the equivalent `TemporalMatmul` (no FFT)."""
        model = copy.deepcopy(self)
        for name, module in list(model.named_modules()):
            if isinstance(module, TemporalConv):
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, TemporalMatmul.from_temporal(module))
        return model


def student_from_teacher(teacher_backbone: nn.Module, times: Sequence[float], modes: int,
                         skip: Sequence[float] | None = None,
                         time_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         is_unit: UnitPredicate | None = None, **coefficients: Sequence[float]) -> DSNO:
    """A DSNO whose backbone is a copy of the teacher network (all weights), plus identity temporal layers.

    At init, branch m of the student's net equals the teacher network evaluated at
    (in_scale[m] x_T, net_times[m]); `coefficients`: out_scale, in_scale, net_times (see `DSNO`).
    """
    return DSNO(copy.deepcopy(teacher_backbone), times, modes, skip, time_input, is_unit, **coefficients)


@torch.no_grad()
def load_backbone_weights(model: DSNO, network: nn.Module) -> None:
    """Copy every weight of a bare backbone network (e.g. the teacher's) into `model`'s backbone.

    network must have the architecture the DSNO was built with (a diffusers UNet2DModel may be
    given bare or adapted). Temporal layers are left as they are. Raises ValueError naming the
    first missing, unexpected or differently shaped weight.
    """
    target = model.backbone
    if isinstance(target, DiffusersUNet) and not isinstance(network, DiffusersUNet):
        target = target.unet
    wrapped = [name for name, mod in target.named_modules() if isinstance(mod, WithTemporal)]

    def student_key(key: str) -> str:
        for name in wrapped:
            if key.startswith(name + "."):
                return f"{name}.unit.{key[len(name) + 1:]}"
        return key

    student = target.state_dict()
    temporal = {k for k in student if any(k.startswith(f"{name}.temporal.") for name in wrapped)}
    source = {student_key(k): v for k, v in network.state_dict().items()}
    unexpected = sorted(set(source) - set(student))
    missing = sorted(set(student) - set(source) - temporal)
    wrong = sorted(k for k in set(source) & set(student) if source[k].shape != student[k].shape)
    if unexpected or missing or wrong:
        detail = (f"unexpected {unexpected[:3]}" if unexpected else f"missing {missing[:3]}" if missing
                  else f"{wrong[0]}: {tuple(source[wrong[0]].shape)} vs {tuple(student[wrong[0]].shape)}")
        raise ValueError(f"{type(network).__name__} does not match the DSNO backbone ({detail})")
    for key, value in source.items():
        student[key].copy_(value)


# -------------------------------------------------------------------------------------------------
# JSON config


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a DSNO build config; returns it unchanged. Raises ValueError naming the bad entry.

    {"format_version": 1,
     "backbone": {"type": "unet", "kwargs": {...UNet kwargs}}
               | {"type": "diffusers_unet2d", "config": {...UNet2DModel config}},
     "time_input": "continuous" | {"discrete": N},
     "times": [t_1, ..., t_M], "modes": k, "skip": [c_1, ..., c_M] (optional),
     "out_scale", "in_scale", "net_times": [M] each (optional; defaults 1, 1, times: old configs),
     "parameterization": {"kind": "state" | "denoised", "prediction": ..., ...} (optional, a record),
     "image_shape": [C, H, W], "data_range": [lo, hi], "schedule": {...} (VPSchedule.to_dict()),
     "data_channels": c (optional: an augmented process's states [C, H, W] hold the data in the first c
     channels, the momentum after them; "process": its record)}
    The backbone takes image_shape's C channels and emits C (whole states) or data_channels (the data
    part of each state, an augmented student's; see `output_channels`).
    """
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"config['format_version'] must be an int, got {version!r}")
    if version > CONFIG_FORMAT_VERSION:
        raise ValueError(f"config format_version {version}: written by a newer dsno; upgrade "
                         f"(this one reads format_version <= {CONFIG_FORMAT_VERSION})")
    for key in ("backbone", "times", "modes", "image_shape"):
        if key not in config:
            raise ValueError(f"config is missing {key!r}")
    backbone = config["backbone"]
    kind = backbone.get("type") if isinstance(backbone, dict) else None
    if kind == "unet":
        if not isinstance(backbone.get("kwargs", {}), dict):
            raise ValueError("config['backbone']['kwargs'] must be a dict of UNet arguments")
    elif kind == "diffusers_unet2d":
        if not isinstance(backbone.get("config"), dict):
            raise ValueError("config['backbone']['config'] must be a UNet2DModel config dict")
    else:
        raise ValueError(f"config['backbone']['type'] must be 'unet' or 'diffusers_unet2d', got {kind!r}")
    time_input = config.get("time_input", "continuous")
    if not (time_input == "continuous" or (isinstance(time_input, dict) and set(time_input) == {"discrete"}
                                           and isinstance(time_input["discrete"], int)
                                           and time_input["discrete"] > 0)):
        raise ValueError(f"config['time_input'] must be 'continuous' or {{'discrete': N}}, got {time_input!r}")
    shape = config["image_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(s, int) and s > 0
                                                                        for s in shape)):
        raise ValueError(f"config['image_shape'] must be [C, H, W] (positive ints), got {shape!r}")
    data_range = config.get("data_range", [-1.0, 1.0])
    if not (isinstance(data_range, (list, tuple)) and len(data_range) == 2 and data_range[0] < data_range[1]):
        raise ValueError(f"config['data_range'] must be [lo, hi] with lo < hi, got {data_range!r}")
    channels = config.get("data_channels", shape[0])
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= shape[0]:
        raise ValueError(f"config['data_channels'] must be an int in [1, {shape[0]}] (the leading channels of a "
                         f"state that are the data), got {channels!r}")
    _check_times(config["times"])
    for key in ("skip", "out_scale", "in_scale", "net_times"):
        values = config.get(key)
        if values is not None and not (isinstance(values, (list, tuple)) and len(values) == len(config["times"])
                                       and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise ValueError(f"config[{key!r}] must have one coefficient per time ({len(config['times'])} finite "
                             f"numbers), got {values!r}")
    if not all(0.0 <= t <= 1.0 for t in config.get("net_times") or []):
        raise ValueError(f"config['net_times'] must lie in [0, 1], got {config['net_times']!r}")
    param = config.get("parameterization", {"kind": "state"})
    if not (isinstance(param, dict) and param.get("kind") in ("state", "denoised")):
        raise ValueError(f"config['parameterization'] must be a dict with kind 'state' or 'denoised', got {param!r}")
    _check_backbone_shape(backbone, shape, channels)
    return config


def _backbone_args(backbone: dict[str, Any]) -> dict[str, Any]:
    """A "backbone" entry's in_channels, out_channels and image_size, the constructor's defaults filled in."""
    if backbone["type"] == "unet":
        defaults = {k: p.default for k, p in inspect.signature(UNet).parameters.items()}
        return {**defaults, **backbone.get("kwargs", {})}
    args = {"in_channels": 3, "out_channels": 3, "sample_size": None, **backbone["config"]}
    args["image_size"] = args["sample_size"]
    return args


def _check_backbone_shape(backbone: dict[str, Any], image_shape: Sequence[int], data_channels: int) -> None:
    c, h, w = image_shape
    args = _backbone_args(backbone)
    size = args["image_size"]
    sizes = (size, size) if isinstance(size, int) else tuple(size) if size is not None else (h, w)
    if (args["in_channels"], *sizes) != (c, h, w) or args["out_channels"] not in (c, data_channels):
        raise ValueError(f"config['image_shape'] {list(image_shape)} does not match the backbone "
                         f"(in_channels={args['in_channels']}, out_channels={args['out_channels']}, "
                         f"image size={list(sizes)}); it must take C channels and emit C or data_channels "
                         f"({data_channels})")


def output_channels(config: dict[str, Any]) -> int:
    """The channels a DSNO of this (validated) build config emits per time: image_shape's C, or
    data_channels for a backbone that emits only the data part of an augmented state."""
    return int(_backbone_args(config["backbone"])["out_channels"])


def _time_input(spec: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    return None if spec == "continuous" else DiscreteTime(spec["discrete"])


def build_backbone(spec: dict[str, Any]) -> nn.Module:
    """The bare backbone network of a config's "backbone" entry (no temporal layers)."""
    if spec["type"] == "unet":
        return UNet(**spec.get("kwargs", {}))
    from diffusers import UNet2DModel
    return DiffusersUNet(UNet2DModel.from_config(spec["config"]))


def diffusers_backbone_spec(unet: nn.Module) -> dict[str, Any]:
    """The JSON "backbone" entry of a diffusers UNet2DModel."""
    return {"type": "diffusers_unet2d",
            "config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}}


def build_dsno(config: dict[str, Any]) -> DSNO:
    """A freshly initialised DSNO (temporal layers at identity) from a build config."""
    validate_config(config)
    backbone = build_backbone(config["backbone"])
    return DSNO(backbone, config["times"], config["modes"], config.get("skip"),
                _time_input(config.get("time_input", "continuous")), out_scale=config.get("out_scale"),
                in_scale=config.get("in_scale"), net_times=config.get("net_times"))
