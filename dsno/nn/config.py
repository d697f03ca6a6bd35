"""The build config of a DSNO: one frozen dataclass whose fields are the operator's arguments.

    config = SamplerConfig.from_dict(json_dict)   # every field typed and bounded, else ConfigError
    config.to_dict()                              # the JSON written to config.json / dsno_config.json
    build_dsno(config)                            # dsno.nn.dsno

It is read and written only here (diffusers' `register_to_config` / `from_config` idea), and its
bounds (BOUNDS_HINT) hold before any tensor is made: a config from another install cannot ask
for a 65536-pixel image, a 200,000-channel layer or 10^10 time steps. The same bounds check the
backbone records of teacher weights (`check_unet_kwargs`, `check_diffusers_unet_config`).

    {"format_version": 2,
     "backbone": {"type": "unet", "kwargs": {...UNet kwargs}}
               | {"type": "diffusers_unet2d", "config": {...UNet2DModel config}},
     "time_input": "continuous" | {"discrete": N},
     "times": [t_1, ..., t_M], "modes": k, "skip": [c_1, ..., c_M] (optional),
     "out_scale", "in_scale", "net_times": [M] each (optional; defaults 1, 1, times: old configs),
     "parameterization": {"kind": "state" | "denoised", ...} (optional, a record),
     "state_shape": [C, H, W], "data_range": [lo, hi], "schedule": {...} (VPSchedule.to_dict()),
     "data_channels": c (optional: an augmented process's states [C, H, W] hold the data in the first c
     channels, the momentum after them; "process": its record), "experiment": name (optional),
     "num_classes": K (optional: a class-conditional DSNO, called with labels [B] in [0, K))}
The backbone takes state_shape's C channels and emits C (whole states) or data_channels (the data
part of each state, an augmented student's; see `SamplerConfig.output_channels`). state_shape is the
shape of one solver state (x_T and every output), which is the image's only for a non-augmented process.
format_version 1 named it "image_shape": such a config (an older sampler folder or run) still reads.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from dsno.errors import UserError
from dsno.jsonfile import excerpt as show
from dsno.nn.unet import UNet
from dsno.renamed import read_renamed_keys

CONFIG_FORMAT_VERSION = 2
RENAMED_KEYS = {"image_shape": ("state_shape", 2)}     # old key -> (new key, the format_version that renamed it)

MAX_CHANNELS = 64               # channels of a state (state_shape's C) or a backbone's input / output
MAX_IMAGE_SIDE = 2048           # pixels per side
MAX_STATE_ELEMENTS = 1 << 24    # C * H * W of one state (64 MiB in float32)
MAX_WIDTH = 8192                # channels of any backbone layer
MAX_LEVELS = 8                  # resolutions of a UNet
MAX_RES_BLOCKS = 16             # residual units per level
MAX_TIMES = 1024                # output times M
MAX_TRAIN_TIMESTEPS = 100_000   # discrete time steps (time_input, scheduler configs)
MAX_CLASSES = 100_000           # class labels of a conditional backbone
BOUNDS_HINT = (f"bounds: channels <= {MAX_CHANNELS}, image side <= {MAX_IMAGE_SIDE}, layer width <= {MAX_WIDTH}, "
               f"<= {MAX_TIMES} times, <= {MAX_TRAIN_TIMESTEPS:,} time steps")


class ConfigError(UserError):
    """A build config or backbone record entry has the wrong type or lies outside its bounds."""


def check_int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{key} must be an integer in [{lo}, {hi:,}], got {show(value)}")
    return value


def check_number(key: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not lo <= value <= hi):
        where = "" if (lo, hi) == (-math.inf, math.inf) else f" in [{lo}, {hi}]"
        raise ConfigError(f"{key} must be a finite number{where}, got {show(value)}")
    return float(value)


def check_list(key: str, value: Any, lo_len: int, hi_len: int) -> list:
    if not isinstance(value, (list, tuple)) or not lo_len <= len(value) <= hi_len:
        raise ConfigError(f"{key} must be a list of {lo_len} to {hi_len} entries, got {show(value)}")
    return list(value)


def check_times(times: Any, key: str = "times") -> list[float]:
    """M output times: 1 <= M <= MAX_TIMES numbers in [0, 1], strictly decreasing."""
    if (not isinstance(times, (list, tuple)) or not 1 <= len(times) <= MAX_TIMES
            or not all(not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) and 0.0 <= t <= 1.0
                       for t in times)):
        raise ConfigError(f"{key} must be a non-empty list of at most {MAX_TIMES} numbers in [0, 1], got {show(times)}")
    times = [float(t) for t in times]
    if any(a <= b for a, b in zip(times, times[1:])):
        raise ConfigError(f"{key} must be strictly decreasing (t_1 > ... > t_M), got {show(times)}")
    return times


def check_per_time(key: str, values: Any, m: int) -> list[float]:
    """One finite coefficient per output time."""
    if not (isinstance(values, (list, tuple)) and len(values) == m
            and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
        raise ConfigError(f"{key} must have one coefficient per time ({m} finite numbers), got {show(values)}")
    return [float(v) for v in values]


def check_modes(modes: Any, num_times: int) -> int:
    """Kept Fourier modes of M = num_times output times: an int in [1, M // 2 + 1]."""
    hi = num_times // 2 + 1
    if isinstance(modes, bool) or not isinstance(modes, int) or not 1 <= modes <= hi:
        raise ConfigError(f"modes must lie in [1, num_times // 2 + 1] = [1, {hi}] for num_times={num_times}, "
                          f"got {show(modes)}")
    return modes


def check_format_version(version: Any) -> int:
    """A config's format_version: an int this dsno reads (<= CONFIG_FORMAT_VERSION)."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"config['format_version'] must be an int, got {show(version)}")
    if version > CONFIG_FORMAT_VERSION:
        raise ConfigError(f"config format_version {version}: written by a newer dsno; upgrade "
                          f"(this one reads format_version <= {CONFIG_FORMAT_VERSION})")
    return version


# -------------------------------------------------------------------------------------------------
# backbones

def _unet_defaults() -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(UNet).parameters.items()}


def check_unet_kwargs(kwargs: Any, where: str = "backbone kwargs") -> dict[str, Any]:
    """Every `dsno.nn.UNet` argument (defaults filled in, JSON-ready lists), typed and bounded; unknown
    names are refused. ConfigError names `where` and the key."""
    defaults = _unet_defaults()
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where} must be a dict of UNet arguments, got {show(kwargs)}")
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown UNet arguments {show(unknown)}; allowed: {sorted(defaults)}")
    args = {**defaults, **kwargs}
    for key, hi in (("in_channels", MAX_CHANNELS), ("out_channels", MAX_CHANNELS), ("base_channels", MAX_WIDTH),
                    ("num_res_blocks", MAX_RES_BLOCKS), ("image_size", MAX_IMAGE_SIDE), ("num_groups", MAX_WIDTH),
                    ("num_heads", MAX_WIDTH)):
        check_int(f"{where}[{key!r}]", args[key], 1, hi)
    mult = check_list(f"{where}['channel_mult']", args["channel_mult"], 1, MAX_LEVELS)
    for m in mult:
        check_int(f"{where}['channel_mult'] entries (times base_channels {args['base_channels']})",
                  m, 1, MAX_WIDTH // args["base_channels"])
    for r in check_list(f"{where}['attn_resolutions']", args["attn_resolutions"], 0, 4 * MAX_LEVELS):
        check_int(f"{where}['attn_resolutions'] entries", r, 1, MAX_IMAGE_SIDE)
    check_number(f"{where}['dropout']", args["dropout"], 0.0, 1.0)
    check_number(f"{where}['time_scale']", args["time_scale"], 0.0, 1e9)
    if args["num_classes"] is None:
        del args["num_classes"]     # unconditional: the record (and so a teacher's fingerprint) as before
    else:
        check_int(f"{where}['num_classes']", args["num_classes"], 1, MAX_CLASSES)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


# diffusers' UNet2DModel defaults of the keys bounded here (diffusers reads the rest)
DIFFUSERS_DEFAULTS = {"in_channels": 3, "out_channels": 3, "sample_size": None, "layers_per_block": 2,
                      "block_out_channels": [224, 448, 672, 896], "norm_num_groups": 32}
DIFFUSERS_OPTIONAL_INTS = {"attention_head_dim": MAX_WIDTH, "attn_norm_num_groups": MAX_WIDTH,
                           "time_embedding_dim": 4 * MAX_WIDTH, "num_class_embeds": MAX_TRAIN_TIMESTEPS,
                           "num_train_timesteps": MAX_TRAIN_TIMESTEPS}


def check_diffusers_unet_config(config: Any, where: str = "backbone config") -> dict[str, Any]:
    """A UNet2DModel config's sizes (channels, sample_size, block widths, layers, groups, heads),
    typed and bounded; returns the config unchanged."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where} must be a UNet2DModel config dict, got {show(config)}")
    args = {**DIFFUSERS_DEFAULTS, **config}
    check_int(f"{where}['in_channels']", args["in_channels"], 1, MAX_CHANNELS)
    check_int(f"{where}['out_channels']", args["out_channels"], 1, MAX_CHANNELS)
    size = args["sample_size"]
    if size is not None:
        for s in (check_list(f"{where}['sample_size']", size, 2, 2) if isinstance(size, (list, tuple)) else [size]):
            check_int(f"{where}['sample_size']", s, 1, MAX_IMAGE_SIDE)
    widths = check_list(f"{where}['block_out_channels']", args["block_out_channels"], 1, MAX_LEVELS)
    for w in widths:
        check_int(f"{where}['block_out_channels'] entries", w, 1, MAX_WIDTH)
    for key in ("down_block_types", "up_block_types"):
        if key in args and (not isinstance(args[key], (list, tuple)) or len(args[key]) != len(widths)):
            raise ConfigError(f"{where}[{key!r}] must list one block per block_out_channels entry ({len(widths)}), "
                              f"got {show(args[key])}")
    check_int(f"{where}['layers_per_block']", args["layers_per_block"], 1, MAX_RES_BLOCKS)
    check_int(f"{where}['norm_num_groups']", args["norm_num_groups"], 1, MAX_WIDTH)
    for key, hi in DIFFUSERS_OPTIONAL_INTS.items():
        if args.get(key) is not None:
            check_int(f"{where}[{key!r}]", args[key], 1, hi)
    return config


def backbone_io(backbone: dict[str, Any]) -> tuple[int, int, Optional[tuple[int, int]]]:
    """(in_channels, out_channels, (H, W) or None) of a checked "backbone" entry, defaults filled in."""
    if backbone["type"] == "unet":
        args = {**_unet_defaults(), **backbone.get("kwargs", {})}
        size = args["image_size"]
    else:
        args = {**DIFFUSERS_DEFAULTS, **backbone["config"]}
        size = args["sample_size"]
    sizes = None if size is None else (size, size) if isinstance(size, int) else tuple(size)
    return args["in_channels"], args["out_channels"], sizes


def backbone_classes(backbone: dict[str, Any]) -> Optional[int]:
    """The class labels a checked "backbone" entry embeds (UNet `num_classes`, diffusers `num_class_embeds`);
    None for an unconditional backbone."""
    if backbone["type"] == "unet":
        return backbone.get("kwargs", {}).get("num_classes")
    return backbone["config"].get("num_class_embeds")


def check_backbone(backbone: Any) -> dict[str, Any]:
    """A "backbone" entry: {"type": "unet", "kwargs": {...}} or {"type": "diffusers_unet2d", "config": {...}}."""
    kind = backbone.get("type") if isinstance(backbone, dict) else None
    if kind == "unet":
        extra = sorted(set(backbone) - {"type", "kwargs"})
        check_unet_kwargs(backbone.get("kwargs", {}), "config['backbone']['kwargs']")
    elif kind == "diffusers_unet2d":
        extra = sorted(set(backbone) - {"type", "config"})
        if not isinstance(backbone.get("config"), dict):
            raise ConfigError("config['backbone']['config'] must be a UNet2DModel config dict")
        check_diffusers_unet_config(backbone["config"], "config['backbone']['config']")
    else:
        raise ConfigError(f"config['backbone']['type'] must be 'unet' or 'diffusers_unet2d', got {show(kind)}")
    if extra:
        raise ConfigError(f"config['backbone'] has unknown keys {show(extra)}")
    return backbone


# -------------------------------------------------------------------------------------------------
# the build config

PerTime = Optional[tuple[float, ...]]


@dataclass(frozen=True)
class SamplerConfig:
    """A DSNO build config (see the module docstring); every field checked on construction."""

    backbone: dict[str, Any]
    times: tuple[float, ...]
    modes: int
    state_shape: tuple[int, int, int]
    time_input: Union[str, dict[str, int]] = "continuous"
    skip: PerTime = None
    out_scale: PerTime = None
    in_scale: PerTime = None
    net_times: PerTime = None
    data_range: tuple[float, float] = (-1.0, 1.0)
    data_channels: Optional[int] = None
    num_classes: Optional[int] = None
    parameterization: Optional[dict[str, Any]] = None
    schedule: Optional[dict[str, Any]] = None
    process: Optional[dict[str, Any]] = None
    experiment: Optional[str] = None
    format_version: int = CONFIG_FORMAT_VERSION

    def __post_init__(self) -> None:
        check_format_version(self.format_version)
        self._put("backbone", copy.deepcopy(check_backbone(self.backbone)))     # owned: the caller's dict may change
        times = check_times(self.times)
        self._put("times", tuple(times))
        check_modes(self.modes, len(times))
        self._check_time_input()
        for key in ("skip", "out_scale", "in_scale", "net_times"):
            if getattr(self, key) is not None:
                self._put(key, tuple(check_per_time(f"config[{key!r}]", getattr(self, key), len(times))))
        if self.net_times is not None and not all(0.0 <= t <= 1.0 for t in self.net_times):
            raise ConfigError(f"config['net_times'] must lie in [0, 1], got {show(list(self.net_times))}")
        shape = check_list("config['state_shape'] ([C, H, W])", self.state_shape, 3, 3)
        check_int("config['state_shape'] C", shape[0], 1, MAX_CHANNELS)
        for side in shape[1:]:
            check_int("config['state_shape'] H and W", side, 1, MAX_IMAGE_SIDE)
        if math.prod(shape) > MAX_STATE_ELEMENTS:
            raise ConfigError(f"config['state_shape'] {shape} has more than {MAX_STATE_ELEMENTS:,} elements")
        self._put("state_shape", tuple(shape))
        lo, hi = check_list("config['data_range'] ([lo, hi])", self.data_range, 2, 2)
        if check_number("config['data_range'] lo", lo) >= check_number("config['data_range'] hi", hi):
            raise ConfigError(f"config['data_range'] must be [lo, hi] with lo < hi, got {show(self.data_range)}")
        self._put("data_range", (float(lo), float(hi)))
        if self.data_channels is not None:
            check_int("config['data_channels'] (the leading channels of a state that are the data)",
                      self.data_channels, 1, shape[0])
        if self.num_classes is not None:
            check_int("config['num_classes'] (labels in [0, num_classes))", self.num_classes, 1, MAX_CLASSES)
        param = self.parameterization
        if param is not None and not (isinstance(param, dict) and param.get("kind") in ("state", "denoised")):
            raise ConfigError(f"config['parameterization'] must be a dict with kind 'state' or 'denoised', "
                              f"got {show(param)}")
        for key in ("schedule", "process"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), dict):
                raise ConfigError(f"config[{key!r}] must be a record (a dict), got {show(getattr(self, key))}")
        if self.experiment is not None and not isinstance(self.experiment, str):
            raise ConfigError(f"config['experiment'] must be a name, got {show(self.experiment)}")
        self._check_backbone_shape()
        self._check_backbone_classes()

    def _put(self, name: str, value: Any) -> None:
        """Store a field's normalised value (tuples, floats) on the frozen instance."""
        object.__setattr__(self, name, value)

    def _check_time_input(self) -> None:
        spec = self.time_input
        if spec == "continuous":
            return
        if not (isinstance(spec, dict) and set(spec) == {"discrete"}):
            raise ConfigError(f"config['time_input'] must be 'continuous' or {{'discrete': N}}, got {show(spec)}")
        check_int("config['time_input']['discrete']", spec["discrete"], 1, MAX_TRAIN_TIMESTEPS)

    def _check_backbone_shape(self) -> None:
        c, h, w = self.state_shape
        c_in, c_out, sizes = backbone_io(self.backbone)
        sizes = sizes or (h, w)
        data_channels = self.data_channels or c
        if (c_in, *sizes) != (c, h, w) or c_out not in (c, data_channels):
            raise ConfigError(f"config['state_shape'] {list(self.state_shape)} does not match the backbone "
                              f"(in_channels={c_in}, out_channels={c_out}, image size={list(sizes)}); it must take "
                              f"C channels and emit C or data_channels ({data_channels})")

    def _check_backbone_classes(self) -> None:
        embeds = backbone_classes(self.backbone)
        fits = embeds is None if self.num_classes is None else embeds is not None and embeds >= self.num_classes
        if not fits:
            raise ConfigError(f"config['num_classes'] {show(self.num_classes)} does not match the backbone, which "
                              f"embeds {embeds if embeds is not None else 'no'} class labels: a conditional sampler "
                              "needs a backbone with a class embedding of at least num_classes labels, an "
                              "unconditional one a backbone without")

    @property
    def output_channels(self) -> int:
        """The channels the DSNO emits per time: state_shape's C, or data_channels for a backbone that
        emits only the data part of an augmented state."""
        return int(backbone_io(self.backbone)[1])

    @classmethod
    def from_dict(cls, config: Any) -> "SamplerConfig":
        """The config of a JSON dict (unknown or missing keys refused by name), in the current format: an
        older format's renamed keys are read under their new names (RENAMED_KEYS)."""
        if not isinstance(config, dict):
            raise ConfigError(f"config must be a dict (a JSON object), got {type(config).__name__}")
        version = check_format_version(config.get("format_version"))  # first: a newer dsno's keys are not unknown
        config = {**read_renamed_keys(config, version, RENAMED_KEYS, "config", ConfigError),
                  "format_version": CONFIG_FORMAT_VERSION}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise ConfigError(f"config has unknown keys {show(unknown)}; allowed: {names}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in config]
        if missing:
            raise ConfigError(f"config is missing {missing[0]!r}")
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this config (fields left at None omitted; tuples as lists)."""
        out: dict[str, Any] = {"format_version": self.format_version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name != "format_version":
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def as_config(config: Union[SamplerConfig, dict[str, Any]]) -> SamplerConfig:
    """A SamplerConfig, or the checked one of a JSON dict."""
    return config if isinstance(config, SamplerConfig) else SamplerConfig.from_dict(config)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a DSNO build config dict (`SamplerConfig.from_dict`); returns it unchanged. Raises
    ConfigError (a ValueError) naming the bad entry."""
    SamplerConfig.from_dict(config)
    return config


def output_channels(config: Union[SamplerConfig, dict[str, Any]]) -> int:
    """`SamplerConfig.output_channels` of a config or its dict."""
    return as_config(config).output_channels

