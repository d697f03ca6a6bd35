"""Typed run configuration: the schema Hydra configs are checked against, and range checks.

`validate(cfg)` merges a composed Hydra config into the schema (unknown keys and wrong types
fail there, naming the key) and then range-checks every value before any work starts.
Each mistake is reported as one line: the key, the bad value, and what is allowed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dsno.errors import UserError


class ConfigError(UserError):
    """A configuration value is wrong. The message names the key, the value and what is allowed."""


@dataclass
class ScheduleConfig:
    kind: str = "linear"            # linear | cosine | ddpm_linear
    beta_min: float = 0.1
    beta_max: float = 20.0
    s: float = 0.008
    num_steps: int = 1000           # ddpm_linear only
    beta_start: float = 1e-4        # ddpm_linear only
    beta_end: float = 0.02          # ddpm_linear only


@dataclass
class TeacherConfig:
    kind: str = "mnist_gmm"         # mnist_gmm | gmm_file | unet | diffusers
    size: int = 16                  # image side, pixels (mnist_gmm, unet)
    components: int = 64            # mixture components (mnist_gmm)
    path: Optional[str] = None      # weights file or folder (gmm_file, unet, diffusers)
    prediction: str = "eps"         # what the teacher predicts: eps | x0 | v; must match its weights (checked at load)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class SolverConfig:
    name: str = "dpm_solver_pp"
    order: int = 3
    steps: int = 60                 # grid steps of the teacher solve (output times are added to the grid)
    spacing: str = "logsnr"
    t_end: float = 1e-3
    options: dict = field(default_factory=dict)
    schedule: Optional[str] = None  # solver=usf: the schedule YAML (python -m dsno.search); it fixes the grid


@dataclass
class DataConfig:
    dir: str = "${run_dir}/trajectories"
    num_trajectories: int = 4096
    shard_size: int = 1024
    batch_size: int = 512           # trajectories per teacher solve
    times: list = field(default_factory=lambda: [0.5625, 0.25, 0.0625, 0.001])
    repair: bool = False
    verify: str = "quick"           # none | quick | full
    val_fraction: float = 0.05
    num_workers: int = 0
    precision: str = "fp32"         # neural teachers: fp32 | bf16 (autocast; exact teachers stay float64)
    compile: bool = False           # torch.compile the teacher network (default mode)
    channels_last: bool = False     # channels_last memory format for the teacher network


@dataclass
class BackboneConfig:
    type: str = "unet"              # unet | teacher (copy the neural teacher's network)
    base_channels: int = 24
    channel_mult: list = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attn_resolutions: list = field(default_factory=lambda: [8])
    dropout: float = 0.0


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    modes: int = 2                  # Fourier modes kept over the M time points, <= M // 2 + 1
    sigma_data: float = 0.5         # data std used for the skip connection
    parameterization: str = "denoised"   # state | denoised (dsno.nn.parameterization)
    denoise_time: float = 0.5       # tau_0: the "denoised" branches' time inputs lie in [tau_0, T]


@dataclass
class TrainConfig:
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.999
    loss: str = "l2"                # l2 | l1 | lpips (VGG features, dsno.training.perceptual)
    perceptual_weights: Optional[str] = None   # lpips: local VGG-16 weights file (default: torch hub cache)
    temporal_impl: str = "auto"     # auto | fft | matmul: how the temporal layers run in training
    weight_min: float = 1.0
    weight_max: float = 1e4
    grad_clip: float = 1.0
    resume: bool = True             # continue from checkpoints/last.ckpt when it exists
    checkpoint_every: int = 100     # steps


@dataclass
class TrainerConfig:
    max_steps: int = 600
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 20
    val_check_interval: int = 250


@dataclass
class LoggerConfig:
    kind: str = "wandb"             # wandb | csv
    mode: str = "offline"           # wandb: offline | online | disabled
    project: str = "dsno"


@dataclass
class EvalConfig:
    num_samples: int = 256
    batch_size: int = 256
    nfe: list = field(default_factory=lambda: [1, 2, 3, 5, 10, 20])
    solvers: list = field(default_factory=lambda: [{"name": "ddim"}])   # conf/eval/default.yaml lists them all
    spacing: str = "logsnr"
    reference_steps: int = 500
    fidelity: bool = True
    fidelity_reference: Optional[str] = None    # RGB teachers: .npz of real uint8 images [N, H, W, C]
    inception_weights: Optional[str] = None     # RGB teachers: local Inception file (else torch's hub cache)
    grid_samples: int = 64
    trust_program: bool = False    # open a pt2 / onnx sampler exported by another install
    seed: int = 1234


@dataclass
class ExportConfig:
    forms: list = field(default_factory=lambda: ["safetensors", "pt2", "onnx"])


@dataclass
class RunConfig:
    experiment: str = "mnist_unet_quick"
    run_dir: str = "runs/${experiment}"
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config error: {key}={value!r}: {allowed}")


def _choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        _fail(key, value, f"must be one of {', '.join(map(str, options))}")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(key, value, "must be a positive integer")


def _count(key: str, value: Any, hi: int, why: str, lo: int = 1) -> None:
    """An integer in [lo, hi]; `why` says where the upper bound comes from."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _fail(key, value, "must be a positive integer" if lo == 1 else f"must be an integer >= {lo}")
    if value > hi:
        _fail(key, value, f"must be at most {hi:,}: {why}")


def _finite(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "must be a finite number")


def _in_range(key: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    _finite(key, value)
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        _fail(key, value, f"must lie in {lb}{lo:g}, {hi:g}{rb}")


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Type-check `cfg` against RunConfig and range-check it. Raises ConfigError (one line)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        rc: RunConfig = OmegaConf.to_object(merged)  # resolves interpolations
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config error: {key}: {msg}") from None
    _check(rc)
    return rc


def _check(c: RunConfig) -> None:
    from dsno.solvers import SPACINGS, available
    from dsno.solvers import get as get_solver

    _choice("teacher.kind", c.teacher.kind, ("mnist_gmm", "gmm_file", "unet", "diffusers"))
    _choice("teacher.prediction", c.teacher.prediction, ("eps", "x0", "v"))
    _choice("teacher.schedule.kind", c.teacher.schedule.kind, ("linear", "cosine", "ddpm_linear"))
    _in_range("teacher.size", c.teacher.size, 4, 64)
    _positive_int("teacher.components", c.teacher.components)
    if c.teacher.kind in ("gmm_file", "unet", "diffusers") and c.teacher.path and not os.path.exists(c.teacher.path):
        _fail("teacher.path", c.teacher.path, "does not exist; give the teacher's weights file or folder")
    if c.teacher.kind in ("gmm_file", "diffusers") and not c.teacher.path:
        _fail("teacher.path", c.teacher.path, f"teacher.kind={c.teacher.kind} needs teacher.path=FILE_OR_DIR")
    sc = c.teacher.schedule
    if sc.kind == "linear":
        _in_range("teacher.schedule.beta_min", sc.beta_min, 0.0, 1e4, lo_open=True)
        _in_range("teacher.schedule.beta_max", sc.beta_max, 0.0, 1e4, lo_open=True)
        if not sc.beta_min < sc.beta_max:
            _fail("teacher.schedule.beta_max", sc.beta_max, f"must exceed teacher.schedule.beta_min ({sc.beta_min})")
    elif sc.kind == "cosine":
        _in_range("teacher.schedule.s", sc.s, 0.0, 1.0, lo_open=True, hi_open=True)
    else:
        _count("teacher.schedule.num_steps", sc.num_steps, 100_000, "a DDPM schedule of more steps is continuous "
               "in all but name; use kind=linear")
        _in_range("teacher.schedule.beta_start", sc.beta_start, 0.0, 1.0, lo_open=True, hi_open=True)
        _in_range("teacher.schedule.beta_end", sc.beta_end, 0.0, 1.0, lo_open=True, hi_open=True)
        if not sc.beta_start < sc.beta_end:
            _fail("teacher.schedule.beta_end", sc.beta_end,
                  f"must exceed teacher.schedule.beta_start ({sc.beta_start})")
    _count("seed", c.seed, 2**63 - 1, "seeds are 64-bit signed integers", lo=0)

    _choice("solver.name", c.solver.name, tuple(available()))
    if get_solver(c.solver.name).stochastic:
        _fail("solver.name", c.solver.name, "the teacher solve must be deterministic (a probability-flow ODE "
              "solver): DSNO learns the map from noise to the ODE's trajectory")
    try:
        get_solver(c.solver.name).resolve(c.solver.order, dict(c.solver.options))
    except ValueError as e:
        _fail("solver", f"{c.solver.name}-{c.solver.order} {dict(c.solver.options)}", str(e))
    if c.solver.options.get("method") == "fast":
        _fail("solver.options.method", "fast", "the fast order mix returns no trajectory; use multistep or singlestep")
    _count("solver.steps", c.solver.steps, 10_000, "the teacher solve needs no more; the float64 reference "
           "of eval uses eval.reference_steps")
    _choice("solver.spacing", c.solver.spacing, tuple(SPACINGS))
    _in_range("solver.t_end", c.solver.t_end, 0.0, 1.0, lo_open=True, hi_open=True)

    _positive_int("data.num_trajectories", c.data.num_trajectories)
    _count("data.shard_size", c.data.shard_size, 10**7, "a shard is written and verified whole; keep each "
           "well under memory")
    _count("data.batch_size", c.data.batch_size, 65536, "larger solver batches only exhaust memory")
    _choice("data.verify", c.data.verify, ("none", "quick", "full"))
    _in_range("data.val_fraction", c.data.val_fraction, 0.0, 0.5, hi_open=True)
    _choice("data.precision", c.data.precision, ("fp32", "bf16"))
    _count("data.num_workers", c.data.num_workers, 256, "more loader processes than any machine has cores", lo=0)
    times = list(c.data.times)
    if len(times) < 2:
        _fail("data.times", times, "needs at least 2 output times (M >= 2)")
    if len(times) > 256:
        _fail("data.times", f"[{len(times)} times]", "at most 256 output times (each is one backbone branch)")
    if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) for t in times):
        _fail("data.times", times, "must be finite numbers")
    if any(a <= b for a, b in zip(times, times[1:])):
        _fail("data.times", times, "must be numbers in strictly decreasing order (t_1 > ... > t_M)")
    sched = build_schedule(sc)
    if times[0] > sched.T or times[-1] < sched.t_min:
        _fail("data.times", times, f"must lie inside the schedule's time range [{sched.t_min:g}, {sched.T:g}]")
    if abs(times[-1] - c.solver.t_end) > 1e-12:
        _fail("data.times", times, f"the last output time must equal solver.t_end ({c.solver.t_end:g})")
    segments = len(times) if times[0] < sched.T else len(times) - 1
    if c.solver.steps < segments:
        _fail("solver.steps", c.solver.steps, f"must be at least {segments}: one step per segment between the "
              f"{len(times)} output times (data.times) and the start time {sched.T:g}")
    _check_usf(c, times)

    m = len(times)
    _positive_int("model.modes", c.model.modes)
    if c.model.modes > m // 2 + 1:
        _fail("model.modes", c.model.modes, f"must be <= M // 2 + 1 = {m // 2 + 1} for M = {m} output times")
    _choice("model.backbone.type", c.model.backbone.type, ("unet", "teacher"))
    _count("model.backbone.base_channels", c.model.backbone.base_channels, 4096, "wider than any image UNet")
    _count("model.backbone.num_res_blocks", c.model.backbone.num_res_blocks, 32, "deeper than any image UNet")
    mult = list(c.model.backbone.channel_mult)
    if not mult or len(mult) > 8 or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64
                                        for v in mult):
        _fail("model.backbone.channel_mult", mult, "must be a list of 1 to 8 integers in [1, 64]")
    attn = list(c.model.backbone.attn_resolutions)
    if any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096 for v in attn):
        _fail("model.backbone.attn_resolutions", attn, "must be a list of feature-map sizes (integers in [1, 4096])")
    _in_range("model.backbone.dropout", c.model.backbone.dropout, 0.0, 1.0, hi_open=True)
    _in_range("model.sigma_data", c.model.sigma_data, 0.0, 1e3, lo_open=True)
    _choice("model.parameterization", c.model.parameterization, ("state", "denoised"))
    if c.model.parameterization == "state" and c.model.backbone.type == "teacher":
        _fail("model.parameterization", "state", "a student copied from the teacher keeps the teacher's output "
              "head (eps / x0 / v), not a state: use model.parameterization=denoised")
    _in_range("model.denoise_time", c.model.denoise_time, 0.0, sched.T, lo_open=True)

    _count("train.batch_size", c.train.batch_size, 65536, "larger batches only exhaust memory")
    _in_range("train.lr", c.train.lr, 0.0, 1.0, lo_open=True)
    _count("train.warmup_steps", c.train.warmup_steps, 10**9, "past any trainer.max_steps", lo=0)
    _in_range("train.ema_decay", c.train.ema_decay, 0.0, 1.0, hi_open=True)
    _choice("train.loss", c.train.loss, ("l2", "l1", "lpips"))
    _choice("train.temporal_impl", c.train.temporal_impl, ("auto", "fft", "matmul"))
    if c.train.perceptual_weights is not None and not os.path.isfile(c.train.perceptual_weights):
        _fail("train.perceptual_weights", c.train.perceptual_weights, "does not exist; give a local VGG-16 weights file")
    _in_range("train.weight_max", c.train.weight_max, 0.0, 1e12, lo_open=True)
    _in_range("train.weight_min", c.train.weight_min, 0.0, c.train.weight_max, lo_open=True)
    _count("train.checkpoint_every", c.train.checkpoint_every, 10**9, "past any trainer.max_steps")
    _in_range("train.grad_clip", c.train.grad_clip, 0.0, 1e12)

    _count("trainer.max_steps", c.trainer.max_steps, 10**9, "a billion optimizer steps is past any schedule")
    _count("trainer.num_nodes", c.trainer.num_nodes, 4096, "more nodes than any cluster job")
    _choice("trainer.accelerator", c.trainer.accelerator, ACCELERATORS)
    _count("trainer.log_every_n_steps", c.trainer.log_every_n_steps, 10**9, "past any trainer.max_steps")
    _count("trainer.val_check_interval", c.trainer.val_check_interval, 10**9, "past any trainer.max_steps")
    # the temporal layers' weights are complex: "-true" half precisions would drop their imaginary part
    _choice("trainer.precision", c.trainer.precision, ("32-true", "32", "bf16-mixed", "16-mixed"))

    _choice("logger.kind", c.logger.kind, ("wandb", "csv"))
    _choice("logger.mode", c.logger.mode, ("offline", "online", "disabled"))

    _count("eval.num_samples", c.eval.num_samples, 10**7, "ten million samples is past any FID protocol")
    _count("eval.batch_size", c.eval.batch_size, 65536, "larger batches only exhaust memory")
    _count("eval.grid_samples", c.eval.grid_samples, 1024, "a grid of more images is unreadable", lo=0)
    _count("eval.seed", c.eval.seed, 2**63 - 1, "seeds are 64-bit signed integers", lo=0)
    if not c.eval.nfe or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in c.eval.nfe):
        _fail("eval.nfe", c.eval.nfe, "must be a non-empty list of positive integers")
    if max(c.eval.nfe) > 1000:
        _fail("eval.nfe", c.eval.nfe, "each budget must be at most 1,000 model evaluations: beyond that a solve "
              "is a reference, not a fast baseline (eval.reference_steps sets the reference)")
    for i, s in enumerate(c.eval.solvers):
        if not isinstance(s, dict) or "name" not in s:
            _fail(f"eval.solvers[{i}]", s, "must be a mapping with at least a 'name'")
        _choice(f"eval.solvers[{i}].name", s["name"], tuple(available()))
        opts = {k: v for k, v in s.items() if k not in ("name", "order")}
        try:
            get_solver(s["name"]).resolve(s.get("order"), opts)
        except ValueError as e:
            _fail(f"eval.solvers[{i}]", s, str(e))
    _choice("eval.spacing", c.eval.spacing, tuple(SPACINGS))
    for key in ("fidelity_reference", "inception_weights"):
        path = getattr(c.eval, key)
        if path is not None and not os.path.isfile(path):
            _fail(f"eval.{key}", path, "does not exist; give a local file")
    _count("eval.reference_steps", c.eval.reference_steps, 10_000, "a float64 3rd-order solve converges long "
           "before that")
    for f in c.export.forms:
        _choice("export.forms", f, ("safetensors", "pt2", "onnx"))


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_trainer_hardware(c: RunConfig) -> None:
    """Before training: trainer.accelerator / trainer.devices name hardware this machine has,
    and the data set gives every rank at least one batch. ConfigError (one line) otherwise."""
    import torch
    t = c.trainer
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if t.accelerator in ("gpu", "cuda") and gpus == 0:
        _fail("trainer.accelerator", t.accelerator, "this machine has no CUDA GPU; use auto or cpu")
    if t.accelerator == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        _fail("trainer.accelerator", t.accelerator, "this machine has no MPS device; use auto or cpu")
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and gpus > 0)
    available = gpus if on_gpu else (os.cpu_count() or 1)
    where = f"{gpus} GPU(s)" if on_gpu else f"{available} CPU core(s)"
    devices = t.devices
    if devices in ("auto", -1, "-1"):
        count = available if on_gpu else 1
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        count = devices
    elif isinstance(devices, str) and devices.isdigit() and int(devices) >= 1:
        count = int(devices)
    elif isinstance(devices, (list, tuple)) and devices and all(isinstance(d, int) and d >= 0 for d in devices):
        count = len(devices)
        if max(devices) >= available:
            _fail("trainer.devices", devices, f"names device index {max(devices)}, but this machine has {where}")
    else:
        _fail("trainer.devices", devices, "must be auto, -1, a positive integer or a list of device indices")
    if count > available:
        _fail("trainer.devices", devices, f"asks for {count} devices, but this machine has {where}")
    world = count * t.num_nodes
    n = c.data.num_trajectories
    train_size = n - (0 if c.data.val_fraction == 0 else max(1, round(n * c.data.val_fraction)))
    batches = train_size // c.train.batch_size
    if batches < world:
        _fail("trainer.devices", devices, f"{world} ranks need at least {world} training batches, but "
              f"data.num_trajectories={c.data.num_trajectories} gives {batches} of train.batch_size="
              f"{c.train.batch_size}; make more trajectories or use fewer devices")


def _check_usf(c: RunConfig, times: list) -> None:
    """solver=usf needs solver.schedule, a valid schedule ending at solver.t_end and passing through data.times."""
    if c.solver.name != "usf":
        if c.solver.schedule is not None:
            _fail("solver.schedule", c.solver.schedule, f"applies to solver=usf only, not solver={c.solver.name}")
        return
    from dsno.solvers.usf import ScheduleError, load
    if c.solver.schedule is None:
        _fail("solver.schedule", None, "solver=usf needs solver.schedule=PATH (a YAML of python -m dsno.search)")
    try:
        s = load(c.solver.schedule)
    except ScheduleError as e:
        raise ConfigError(f"config error: solver.schedule: {e}") from None
    if s.max_order > c.solver.order:
        _fail("solver.order", c.solver.order, f"the schedule uses Taylor order {s.max_order}; set solver.order={s.max_order}")
    if abs(s.ts[-1] - c.solver.t_end) > 1e-12:
        _fail("solver.schedule", c.solver.schedule, f"ends at t={s.ts[-1]:g}, not solver.t_end={c.solver.t_end:g}")
    missing = [t for t in times if min(abs(t - u) for u in s.ts) > 1e-9]
    if missing:
        _fail("solver.schedule", c.solver.schedule, f"does not pass through the output times {missing} of data.times; "
              f"search one that does: python -m dsno.search nfe=N 'search.pin_times={[t for t in times[:-1]]}'")


def build_schedule(sc: ScheduleConfig):
    """The VPSchedule a ScheduleConfig describes."""
    from dsno.schedules import VPSchedule
    if sc.kind == "linear":
        return VPSchedule.linear(sc.beta_min, sc.beta_max)
    if sc.kind == "cosine":
        return VPSchedule.cosine(sc.s)
    if sc.kind == "ddpm_linear":
        return VPSchedule.ddpm_linear(sc.num_steps, sc.beta_start, sc.beta_end)
    raise ConfigError(f"config error: teacher.schedule.kind={sc.kind!r}: must be one of linear, cosine, ddpm_linear")
