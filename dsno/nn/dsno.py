"""The DSNO operator: a backbone with temporal Fourier layers that maps x_T to M trajectory points.

`DSNO(x_T, labels=None)`: x_T [B, C, H, W] -> [B, M, C, H, W], branch m the prediction at time t_m;
labels [B] long: a class-conditional backbone's class of each sample, given to all its M branches.
x_T is repeated M times; the backbone runs on [B*M, C, H, W], branch m with the time input of
t_m; after every residual unit (a ResBlock and its attention block, if any) of the down path,
middle and up path, a `TemporalConv` mixes the M branches. Output m is
skip[m] * x_T + out_scale[m] * net_m, the network run on in_scale[m] * x_T at time input
net_times[m] (defaults: skip 0, out_scale 1, in_scale 1, net_times = times; the coefficients of
each output parameterisation come from `dsno.nn.parameterization`).

`build_dsno(config)` builds the operator from its build config (`dsno.nn.config.SamplerConfig`),
the format the training stage writes and the exported sampler folder carries.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from dsno.nn.config import (CONFIG_FORMAT_VERSION, SamplerConfig, as_config, check_per_time, check_times,  # noqa: F401
                            output_channels, validate_config)
from dsno.nn.temporal import TemporalConv, TemporalMatmul
from dsno.nn.unet import ResAttnBlock, UNet
from dsno.trust.tensor_file import shape_mismatch

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
    """Adapter: a diffusers `UNet2DModel` called as fn(x, t, labels=None) -> tensor (its output's `.sample`;
    labels: its `class_labels`)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return self.unet(x, t).sample
        return self.unet(x, t, class_labels=labels).sample


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
        times = check_times(list(times))
        self.num_times = m = len(times)
        skip = check_per_time("skip", [0.0] * m if skip is None else skip, m)
        out_scale = check_per_time("out_scale", [1.0] * m if out_scale is None else out_scale, m)
        in_scale = check_per_time("in_scale", [1.0] * m if in_scale is None else in_scale, m)
        net_times = times if net_times is None else check_per_time("net_times", net_times, m)
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

    def forward(self, x_T: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x_T [B, C, H, W], labels [B] long (a class-conditional backbone's; None: none passed)
        -> [B, M, c, H, W]."""
        b, m = x_T.shape[0], self.num_times
        per_time = (1, m, *([1] * (x_T.ndim - 1)))
        x = (self.in_scale.to(x_T.dtype).reshape(per_time) * x_T.unsqueeze(1)).reshape(b * m, *x_T.shape[1:])
        t = self.net_times.repeat(b)
        if self.time_input is not None:
            t = self.time_input(t)
        if labels is None:
            net = self.backbone(x, t)
        else:          # branch m of sample i is row i * M + m: each label repeated M times
            net = self.backbone(x, t, labels.repeat_interleave(m))
        net = net.reshape(b, m, -1, *x_T.shape[2:])
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
    first missing, unexpected and differently shaped weights.
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
    detail = shape_mismatch({k: tuple(v.shape) for k, v in student.items() if k not in temporal},
                            {k: tuple(v.shape) for k, v in source.items()})
    if detail:
        raise ValueError(f"{type(network).__name__} does not match the DSNO backbone ({detail})")
    for key, value in source.items():
        student[key].copy_(value)


# -------------------------------------------------------------------------------------------------
# JSON config


def _time_input(spec: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    return None if spec == "continuous" else DiscreteTime(spec["discrete"])


def build_backbone(spec: dict[str, Any]) -> nn.Module:
    """The bare backbone network of a config's "backbone" entry (no temporal layers)."""
    if spec["type"] == "unet":
        return UNet(**spec.get("kwargs", {}))
    from diffusers import UNet2DModel  # deferred: loads diffusers only when used
    return DiffusersUNet(UNet2DModel.from_config(spec["config"]))


def diffusers_backbone_spec(unet: nn.Module) -> dict[str, Any]:
    """The JSON "backbone" entry of a diffusers UNet2DModel."""
    return {"type": "diffusers_unet2d",
            "config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}}


def build_dsno(config: SamplerConfig | dict[str, Any]) -> DSNO:
    """A freshly initialised DSNO (temporal layers at identity) from a build config (or its JSON dict,
    checked by `SamplerConfig.from_dict`)."""
    config = as_config(config)
    return DSNO(build_backbone(config.backbone), config.times, config.modes, config.skip,
                _time_input(config.time_input), out_scale=config.out_scale, in_scale=config.in_scale,
                net_times=config.net_times)
