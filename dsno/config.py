"""Typed run configuration: the schema, the one place a default is written.

The dataclasses below are registered in Hydra's ConfigStore by `register_configs()`: the root
schema `schema=run` (`schema=search` adds `nfe` and `search.*` for `python -m dsno.search`), one
`teacher=KIND` option per teacher kind (its own dataclass, from `dsno.teachers.registry`), one
`solver=NAME` option per deterministic solver (from the solver registry, scalar and augmented),
`trainer=default` and `logger=wandb`. YAML files under conf/ carry only what an experiment (or
`trainer=gpu`, `logger=csv`) changes. `compose(*overrides)` composes outside a Hydra entry point.

`validate(cfg)` merges a composed config into the schema, the `teacher` block into its kind's
dataclass (an unknown key, a wrong type or an Enum value outside its choices fails there, naming
the key), then every dataclass range-checks its own values in `__post_init__` and `RunConfig.check()`
the rules between sections. Each mistake is one line: the key, the bad value, and what is allowed.
Choice lists that a registry owns (solvers, spacings, teacher kinds, losses, export forms,
predictions) are read from it, never written here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dsno.errors import UserError


class ConfigError(UserError):
    """A configuration value is wrong. The message names the key, the value and what is allowed."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config error: {key}={value!r}: {allowed}")


def _choice(key: str, value: Any, options: tuple | list) -> None:
    if value not in options:
        _fail(key, value, f"must be one of {', '.join(map(str, options))}")


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


def _existing_path(key: str, value: Optional[str], what: str) -> None:
    if value is not None and not os.path.exists(value):
        _fail(key, value, f"does not exist; give {what}")


SEED_MAX = 2**63 - 1


# ----------------------------------------------------------------------------------------- choices
class ScheduleKind(StrEnum):
    linear = "linear"               # VPSchedule.linear(beta_min, beta_max)
    cosine = "cosine"               # VPSchedule.cosine(s)
    ddpm_linear = "ddpm_linear"     # VPSchedule.ddpm_linear(num_steps, beta_start, beta_end): discrete


class VerifyMode(StrEnum):
    none = "none"
    quick = "quick"
    full = "full"


class TeacherPrecision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"


class BackboneType(StrEnum):
    unet = "unet"                   # a fresh UNet (model.backbone.* sizes it)
    teacher = "teacher"             # copy the neural teacher's network and weights


class Parameterization(StrEnum):
    state = "state"
    denoised = "denoised"


class TemporalImpl(StrEnum):
    auto = "auto"
    fft = "fft"
    matmul = "matmul"


class Accelerator(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"
    mps = "mps"


class LoggerKind(StrEnum):
    wandb = "wandb"
    csv = "csv"


class LoggerMode(StrEnum):
    offline = "offline"             # needs no account; `wandb sync` uploads later
    online = "online"
    disabled = "disabled"


# the temporal layers' weights are complex: "-true" half precisions would drop their imaginary part
TRAINER_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


# ----------------------------------------------------------------------------------------- teacher
@dataclass
class ScheduleConfig:
    """A VP noise schedule; only the keys of its `kind` are read (the others are refused)."""

    kind: ScheduleKind = ScheduleKind.linear
    beta_min: float = 0.1           # linear
    beta_max: float = 20.0          # linear
    s: float = 0.008                # cosine
    num_steps: int = 1000           # ddpm_linear
    beta_start: float = 1e-4        # ddpm_linear
    beta_end: float = 0.02          # ddpm_linear

    KEYS: ClassVar[dict] = {"linear": ("beta_min", "beta_max"), "cosine": ("s",),
                            "ddpm_linear": ("num_steps", "beta_start", "beta_end")}

    def check(self, at: str) -> None:
        unread = [k for ks in (v for kind, v in self.KEYS.items() if kind != self.kind) for k in ks
                  if getattr(self, k) != ScheduleConfig.__dataclass_fields__[k].default]
        if unread:
            owner = next(kind for kind, ks in self.KEYS.items() if unread[0] in ks)
            _fail(f"{at}.{unread[0]}", getattr(self, unread[0]), f"is read by {at}.kind={owner} only, and this "
                  f"schedule is kind={self.kind}; remove it or set {at}.kind={owner}")
        if self.kind == "linear":
            _in_range(f"{at}.beta_min", self.beta_min, 0.0, 1e4, lo_open=True)
            _in_range(f"{at}.beta_max", self.beta_max, 0.0, 1e4, lo_open=True)
            if not self.beta_min < self.beta_max:
                _fail(f"{at}.beta_max", self.beta_max, f"must exceed {at}.beta_min ({self.beta_min})")
        elif self.kind == "cosine":
            _in_range(f"{at}.s", self.s, 0.0, 1.0, lo_open=True, hi_open=True)
        else:
            _count(f"{at}.num_steps", self.num_steps, 100_000, "a DDPM schedule of more steps is continuous "
                   "in all but name; use kind=linear")
            _in_range(f"{at}.beta_start", self.beta_start, 0.0, 1.0, lo_open=True, hi_open=True)
            _in_range(f"{at}.beta_end", self.beta_end, 0.0, 1.0, lo_open=True, hi_open=True)
            if not self.beta_start < self.beta_end:
                _fail(f"{at}.beta_end", self.beta_end, f"must exceed {at}.beta_start ({self.beta_start})")


def build_schedule(sc: ScheduleConfig):
    """The VPSchedule a ScheduleConfig describes."""
    from dsno.schedules import VPSchedule
    if sc.kind == "linear":
        return VPSchedule.linear(sc.beta_min, sc.beta_max)
    if sc.kind == "cosine":
        return VPSchedule.cosine(sc.s)
    return VPSchedule.ddpm_linear(sc.num_steps, sc.beta_start, sc.beta_end)


@dataclass
class TeacherConfig:
    """The keys every teacher kind has. A kind's own dataclass (in its module, registered with
    `dsno.teachers.registry.register_teacher`) adds the keys that change what it loads and
    range-checks them in `__post_init__`. `fixed_schedule()` is the noise schedule the config fixes
    before loading, or None when the weights alone decide it (data.times is then checked at load)."""

    kind: str = MISSING
    process: ClassVar[str] = "scalar"     # the solver registry's process the kind's teacher needs

    def fixed_schedule(self):
        return None


def check_prediction_key(at: str, value: Optional[str]) -> None:
    """teacher.prediction, when given, is one of the predictions a Teacher knows."""
    from dsno.teachers.base import PREDICTIONS
    if value is not None:
        _choice(f"{at}.prediction", value, PREDICTIONS)


# ----------------------------------------------------------------------------------------- solver
@dataclass
class SolverChoice:
    """One solver and its settings: the type of the teacher solve (`solver`) and of every eval
    baseline (`eval.solvers[i]`). order None: the solver's default; options: its keyword options
    (`dsno.solvers.get(name).options`), settable as solver.options.KEY=VALUE."""

    name: str = MISSING
    order: Optional[int] = None
    options: Dict[str, Any] = field(default_factory=dict)

    def check(self, at: str) -> None:
        from dsno.solvers import available
        from dsno.solvers import get as get_solver
        _choice(f"{at}.name", self.name, tuple(available(None)))
        try:
            get_solver(self.name).resolve(self.order, dict(self.options))
        except ValueError as e:
            _fail(at, self.label(), str(e))

    def label(self) -> str:
        """'name-order key=value ...' (order omitted when it is the solver's default and not given)."""
        head = self.name if self.order is None else f"{self.name}-{self.order}"
        return head + "".join(f" {k}={v}" for k, v in self.options.items())

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `dsno.sample` for this choice (order included when given)."""
        return {**({} if self.order is None else {"order": self.order}), **self.options}


@dataclass
class SolverConfig(SolverChoice):
    """The teacher solve that makes DSNO's trajectories: a deterministic ODE solver on a grid."""

    name: str = "dpm_solver_pp"
    steps: int = 60                 # grid steps; the output times data.times are inserted into the grid
    spacing: str = "logsnr"         # one of dsno.solvers.SPACINGS
    t_end: float = 1e-3
    schedule: Optional[str] = None  # solver=usf: the schedule YAML (python -m dsno.search); it fixes the grid

    def __post_init__(self) -> None:
        from dsno.solvers import SPACINGS, available
        from dsno.solvers import get as get_solver
        if self.name in available(None) and get_solver(self.name).stochastic:
            _fail("solver.name", self.name, "the teacher solve must be deterministic (a probability-flow ODE "
                  "solver): DSNO learns the map from noise to the ODE's trajectory")
        self.check("solver")
        self.order = get_solver(self.name).resolve(self.order, {})[0]
        if self.options.get("method") == "fast":
            _fail("solver.options.method", "fast", "the fast order mix returns no trajectory; use multistep or "
                  "singlestep")
        _count("solver.steps", self.steps, 10_000, "the teacher solve needs no more; the float64 reference "
               "of eval uses eval.reference_steps")
        _choice("solver.spacing", self.spacing, tuple(SPACINGS))
        _in_range("solver.t_end", self.t_end, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.name != "usf" and self.schedule is not None:
            _fail("solver.schedule", self.schedule, f"applies to solver=usf only, not solver={self.name}")


# ----------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Teacher trajectories: x_T and the states at the M output times `times` (t_1 > ... > t_M = solver.t_end).

    verify: how shard bytes are trusted, in data_gen (shards already on disk, before resuming) and in
    training. quick: sizes and headers of every shard at start, then each shard's sha256 and finite
    values lazily, before any of its bytes reach a batch (a verified file version is recorded in
    <dir>/verified.json, so later runs skip unchanged files); full: read and verify every shard at
    start, ignoring verified.json; none: sizes and headers only."""

    dir: str = "${run_dir}/trajectories"
    num_trajectories: int = 4096
    shard_size: int = 1024
    batch_size: int = 512           # trajectories per teacher solve
    times: List[float] = field(default_factory=lambda: [0.5625, 0.25, 0.0625, 0.001])
    repair: bool = False            # read every shard (sha256, finite values, no cache), regenerate only bad ones
    verify: VerifyMode = VerifyMode.quick
    val_fraction: float = 0.05
    num_workers: int = 0
    precision: TeacherPrecision = TeacherPrecision.fp32   # neural teachers: bf16 autocast; exact ones stay float64
    compile: bool = False           # torch.compile the teacher network (default mode) for the solve
    channels_last: bool = False     # channels_last memory format for the teacher network

    def __post_init__(self) -> None:
        _count("data.num_trajectories", self.num_trajectories, 10**12, "past any disk")
        _count("data.shard_size", self.shard_size, 10**7, "a shard is written and verified whole; keep each "
               "well under memory")
        _count("data.batch_size", self.batch_size, 65536, "larger solver batches only exhaust memory")
        _in_range("data.val_fraction", self.val_fraction, 0.0, 0.5, hi_open=True)
        _count("data.num_workers", self.num_workers, 256, "more loader processes than any machine has cores", lo=0)
        times = list(self.times)
        if len(times) < 2:
            _fail("data.times", times, "needs at least 2 output times (M >= 2)")
        if len(times) > 256:
            _fail("data.times", f"[{len(times)} times]", "at most 256 output times (each is one backbone branch)")
        if any(not math.isfinite(t) for t in times):
            _fail("data.times", times, "must be finite numbers")
        if any(a <= b for a, b in zip(times, times[1:])):
            _fail("data.times", times, "must be numbers in strictly decreasing order (t_1 > ... > t_M)")


# ----------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    type: BackboneType = BackboneType.unet
    base_channels: int = 24
    channel_mult: List[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attn_resolutions: List[int] = field(default_factory=lambda: [8])   # feature-map sizes with self-attention
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _count("model.backbone.base_channels", self.base_channels, 4096, "wider than any image UNet")
        _count("model.backbone.num_res_blocks", self.num_res_blocks, 32, "deeper than any image UNet")
        mult = list(self.channel_mult)
        if not mult or len(mult) > 8 or any(not 1 <= v <= 64 for v in mult):
            _fail("model.backbone.channel_mult", mult, "must be a list of 1 to 8 integers in [1, 64]")
        if any(not 1 <= v <= 4096 for v in self.attn_resolutions):
            _fail("model.backbone.attn_resolutions", list(self.attn_resolutions),
                  "must be a list of feature-map sizes (integers in [1, 4096])")
        _in_range("model.backbone.dropout", self.dropout, 0.0, 1.0, hi_open=True)


@dataclass
class ModelConfig:
    """DSNO = UNet backbone + temporal Fourier layers after every residual unit.

    parameterization: denoised: branch m predicts a denoised image D_m, mapped to the state by the DDIM
    map from x_T (a copied teacher reads its own head); state: the state itself (dsno.nn.parameterization).
    denoise_time: tau_0, branch m's network runs at time tau_0 + t_m (T - tau_0) on x_T moved to that scale."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    modes: int = 2                  # Fourier modes kept over the M time points, <= M // 2 + 1
    sigma_data: float = 0.5         # data std used for the Gaussian-optimal skip connection
    parameterization: Parameterization = Parameterization.denoised
    denoise_time: float = 0.5

    def __post_init__(self) -> None:
        _count("model.modes", self.modes, 129, "M <= 256 output times keep at most 129 modes")
        _in_range("model.sigma_data", self.sigma_data, 0.0, 1e3, lo_open=True)
        if self.parameterization == "state" and self.backbone.type == "teacher":
            _fail("model.parameterization", "state", "a student copied from the teacher keeps the teacher's output "
                  "head (eps / x0 / v), not a state: use model.parameterization=denoised")


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.999
    loss: str = "l2"                # l2 | l1 | lpips, weighted per time point by clamp(sqrt(SNR), weight_min, weight_max)
    perceptual_weights: Optional[str] = None   # lpips: local VGG-16 weights (torchvision's vgg16-397923af.pth)
    temporal_impl: TemporalImpl = TemporalImpl.auto   # neuralop's SpectralConv (fft) or the same map as a matrix
    weight_min: float = 1.0
    weight_max: float = 1e4
    grad_clip: float = 1.0
    resume: bool = True             # continue from checkpoints/last.ckpt when it exists
    checkpoint_every: int = 100     # steps

    def __post_init__(self) -> None:
        from dsno.training.losses import KINDS
        _count("train.batch_size", self.batch_size, 65536, "larger batches only exhaust memory")
        _in_range("train.lr", self.lr, 0.0, 1.0, lo_open=True)
        _count("train.warmup_steps", self.warmup_steps, 10**9, "past any trainer.max_steps", lo=0)
        _in_range("train.ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        _choice("train.loss", self.loss, KINDS)
        if self.perceptual_weights is not None and not os.path.isfile(self.perceptual_weights):
            _fail("train.perceptual_weights", self.perceptual_weights, "does not exist; give a local VGG-16 weights file")
        _in_range("train.weight_max", self.weight_max, 0.0, 1e12, lo_open=True)
        _in_range("train.weight_min", self.weight_min, 0.0, self.weight_max, lo_open=True)
        _count("train.checkpoint_every", self.checkpoint_every, 10**9, "past any trainer.max_steps")
        _in_range("train.grad_clip", self.grad_clip, 0.0, 1e12)


@dataclass
class TrainerConfig:
    """Passed to lightning.Trainer. accelerator=auto uses a GPU when present."""

    max_steps: int = 600
    accelerator: Accelerator = Accelerator.auto
    devices: Any = "auto"           # auto | -1 | a count | a list of device indices
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"      # one of TRAINER_PRECISIONS
    log_every_n_steps: int = 20
    val_check_interval: int = 250

    def __post_init__(self) -> None:
        _count("trainer.max_steps", self.max_steps, 10**9, "a billion optimizer steps is past any schedule")
        _count("trainer.num_nodes", self.num_nodes, 4096, "more nodes than any cluster job")
        _count("trainer.log_every_n_steps", self.log_every_n_steps, 10**9, "past any trainer.max_steps")
        _count("trainer.val_check_interval", self.val_check_interval, 10**9, "past any trainer.max_steps")
        _choice("trainer.precision", self.precision, TRAINER_PRECISIONS)


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.wandb
    mode: LoggerMode = LoggerMode.offline    # wandb only
    project: str = "dsno"


# ----------------------------------------------------------------------------------------- eval / export
def _default_eval_solvers() -> list[SolverChoice]:
    """Every solver family of the library, at its usual order; budgets a solver can't meet are skipped."""
    return [SolverChoice("ddim", 1), SolverChoice("deis", 3), SolverChoice("ipndm", 3),
            SolverChoice("dpm_solver", 3, {"method": "fast"}), SolverChoice("dpm_solver_pp", 3),
            SolverChoice("dpm_solver_pp", 3, {"shipped_3m": True}), SolverChoice("unipc", 3),
            SolverChoice("euler"), SolverChoice("heun"), SolverChoice("ddpm"), SolverChoice("sde_dpm_solver_pp", 2)]


@dataclass
class EvalConfig:
    num_samples: int = 256
    batch_size: int = 256
    # every budget up to DSNO's equal-time cost (a few NFE on a CPU), then two far ones
    nfe: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8, 10, 20])
    solvers: List[SolverChoice] = field(default_factory=_default_eval_solvers)
    spacing: str = "logsnr"         # one of dsno.solvers.SPACINGS
    reference_steps: Optional[int] = None   # float64 reference solve (DPM-Solver++ 3M) steps; None: by the teacher's cost
                                            # (500 closed-form, a network max(50, 5 x max(eval.nfe)) up to 500)
    reference_rtol: float = 1e-7    # augmented teachers (PSLD): the adaptive DOP853 reference's rtol = atol
    fidelity: bool = True           # FID / KID / IS / precision-recall through torch-fidelity
    fidelity_reference: Optional[str] = None    # FID's real images, .npz uint8 [N, H, W, C]; None: only the digit teachers
    inception_weights: Optional[str] = None     # RGB teachers: local Inception weights file (else torch's hub cache)
    grid_samples: int = 64
    trust_program: bool = False     # open a pt2 / onnx sampler exported by another install
    seed: int = 1234
    timing_repeats: int = 3         # timed calls per method on one batch: the report reads their median and spread

    def __post_init__(self) -> None:
        from dsno.solvers import SPACINGS
        _count("eval.num_samples", self.num_samples, 10**7, "ten million samples is past any FID protocol")
        _count("eval.batch_size", self.batch_size, 65536, "larger batches only exhaust memory")
        _count("eval.grid_samples", self.grid_samples, 1024, "a grid of more images is unreadable", lo=0)
        _count("eval.seed", self.seed, SEED_MAX, "seeds are 64-bit signed integers", lo=0)
        if not self.nfe or any(n < 1 for n in self.nfe):
            _fail("eval.nfe", list(self.nfe), "must be a non-empty list of positive integers")
        if max(self.nfe) > 1000:
            _fail("eval.nfe", list(self.nfe), "each budget must be at most 1,000 model evaluations: beyond that a "
                  "solve is a reference, not a fast baseline (eval.reference_steps sets the reference)")
        for i, s in enumerate(self.solvers):
            s.check(f"eval.solvers[{i}]")
        _choice("eval.spacing", self.spacing, tuple(SPACINGS))
        for key in ("fidelity_reference", "inception_weights"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(path):
                _fail(f"eval.{key}", path, "does not exist; give a local file")
        if self.reference_steps is not None:
            _count("eval.reference_steps", self.reference_steps, 10_000, "a float64 3rd-order solve converges long "
                   "before that")
        _in_range("eval.reference_rtol", self.reference_rtol, 0.0, 1e-3, lo_open=True)
        _count("eval.timing_repeats", self.timing_repeats, 1000, "the median settles long before that")


@dataclass
class ExportConfig:
    forms: List[str] = field(default_factory=lambda: ["safetensors", "pt2", "onnx"])

    def __post_init__(self) -> None:
        from dsno.sampler import FORM_FILES
        for f in self.forms:
            _choice("export.forms", f, tuple(FORM_FILES))


@dataclass
class SearchConfig:
    """`python -m dsno.search` (dsno.search.loop): its sizes are an experiment's to set (a network teacher
    on a CPU needs a smaller search than the mixture); range-checked by dsno.search.loop.check_config."""

    mode: str = "full"                  # full | timesteps (GITS / LD3-style: the grid of `base` only)
    base: str = "unipc"                 # timesteps mode: the fixed solver (unipc | dpm_solver_pp | deis | ipndm | ddim)
    base_order: int = 3
    afs: list = field(default_factory=lambda: ["none", "zero", "mean"])
    batch: int = 256                    # noise samples of the cheap metric
    verify_batch: int = 512             # other noise samples of the full metric
    reference_steps: int = 500          # float64 reference: DPM-Solver++ 3M, logSNR grid
    initial: int = 300                  # random candidates scored before the first round
    rounds: int = 12
    proposals: int = 1500               # children ranked by the predictor per round
    scored_per_round: int = 40
    refine: int = 3                     # sweeps of coordinate descent on the best candidate's times (0: none)
    explore: float = 0.25               # share of a round's scores drawn at random (held out for tau)
    parents: int = 15
    verify_top: int = 10
    pin_times: list = field(default_factory=list)
    seed: int = 0
    resume: bool = True
    out: Optional[str] = None           # default: <run_dir>/schedules
    threads: int = 1                    # torch CPU threads (0: torch's default); small batches run best on one


# ----------------------------------------------------------------------------------------- the run
@dataclass
class RunConfig:
    """A whole run. `teacher` holds the dataclass of its kind (dsno.teachers.registry)."""

    experiment: str = MISSING
    run_dir: str = "runs/${experiment}"
    seed: int = 0
    teacher: Any = MISSING
    solver: SolverConfig = field(default_factory=SolverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def check(self) -> None:
        """The rules between sections (each section checked its own values when it was built)."""
        _count("seed", self.seed, SEED_MAX, "seeds are 64-bit signed integers", lo=0)
        times = list(self.data.times)
        sched = self.teacher.fixed_schedule()
        if sched is not None and (times[0] > sched.T or times[-1] < sched.t_min):
            _fail("data.times", times, f"must lie inside the schedule's time range [{sched.t_min:g}, {sched.T:g}]")
        if abs(times[-1] - self.solver.t_end) > 1e-12:
            _fail("data.times", times, f"the last output time must equal solver.t_end ({self.solver.t_end:g})")
        t_max = sched.T if sched is not None else 1.0
        segments = len(times) if times[0] < t_max else len(times) - 1
        if self.solver.steps < segments:
            _fail("solver.steps", self.solver.steps, f"must be at least {segments}: one step per segment between "
                  f"the {len(times)} output times (data.times) and the start time {t_max:g}")
        self._check_processes()
        self._check_usf(times)
        m = len(times)
        if self.model.modes > m // 2 + 1:
            _fail("model.modes", self.model.modes, f"must be <= M // 2 + 1 = {m // 2 + 1} for M = {m} output times")
        _in_range("model.denoise_time", self.model.denoise_time, 0.0, t_max, lo_open=True)

    def _check_processes(self) -> None:
        """Every solver (the teacher solve, eval's baselines) integrates the teacher's kind of process;
        an augmented process (PSLD) has no log-SNR, so its grids are spaced in time."""
        from dsno.solvers import available
        process = type(self.teacher).process
        own = available(process)
        for key, choice in (("solver", self.solver), *((f"eval.solvers[{i}]", s) for i, s in enumerate(self.eval.solvers))):
            if choice.name not in own:
                _fail(f"{key}.name", choice.name, f"integrates another kind of process than teacher kind "
                      f"{self.teacher.kind} ({process}); its solvers are: {', '.join(own)}")
        if process == "augmented":
            for key, spacing in (("solver.spacing", self.solver.spacing), ("eval.spacing", self.eval.spacing)):
                if spacing not in ("time_uniform", "time_quadratic"):
                    _fail(key, spacing, f"teacher kind {self.teacher.kind} is an augmented process: use "
                          "time_uniform or time_quadratic")
            if self.model.parameterization != "state":
                _fail("model.parameterization", str(self.model.parameterization), f"teacher kind "
                      f"{self.teacher.kind} has no scalar schedule to read a denoised output with: use state")

    def _check_usf(self, times: list) -> None:
        """solver=usf: a valid schedule ending at solver.t_end and passing through data.times."""
        if self.solver.name != "usf":
            return
        if self.solver.schedule is None:
            _fail("solver.schedule", None, "solver=usf needs solver.schedule=PATH (a YAML of python -m dsno.search)")
        from dsno.solvers.usf import ScheduleError, load
        try:
            s = load(self.solver.schedule)
        except ScheduleError as e:
            raise ConfigError(f"config error: solver.schedule: {e}") from None
        if s.max_order > self.solver.order:
            _fail("solver.order", self.solver.order, f"the schedule uses Taylor order {s.max_order}; set "
                  f"solver.order={s.max_order}")
        if abs(s.ts[-1] - self.solver.t_end) > 1e-12:
            _fail("solver.schedule", self.solver.schedule, f"ends at t={s.ts[-1]:g}, not solver.t_end="
                  f"{self.solver.t_end:g}")
        missing = [t for t in times if min(abs(t - u) for u in s.ts) > 1e-9]
        if missing:
            _fail("solver.schedule", self.solver.schedule, f"does not pass through the output times {missing} of "
                  f"data.times; search one that does: python -m dsno.search nfe=N "
                  f"'search.pin_times={[t for t in times[:-1]]}'")


# ----------------------------------------------------------------------------------------- validation
def _omegaconf_error(e: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    return ConfigError(f"config error: {prefix}{key}: {str(e).splitlines()[0]}")


def teacher_config(raw: Any) -> TeacherConfig:
    """The `teacher` block as its kind's dataclass (checked); ConfigError naming a key it lacks."""
    from dsno.teachers.registry import teacher_kinds
    kinds = teacher_kinds()
    node = None
    if isinstance(raw, DictConfig):
        node = OmegaConf.create(OmegaConf.to_container(raw, resolve=True))
    elif isinstance(raw, dict):
        node = OmegaConf.create(raw)
    if node is None or "kind" not in node:
        raise ConfigError(f"config error: teacher: no teacher kind given; choose one with teacher=KIND "
                          f"({', '.join(kinds)})")
    kind = node.kind
    _choice("teacher.kind", kind, tuple(kinds))
    schema = kinds[kind].config
    own = {f.name for f in fields(schema)}
    extra = [k for k in node if k not in own]
    if extra:
        raise ConfigError(f"config error: teacher.{extra[0]}: teacher kind {kind} has no key {extra[0]!r} (its "
                          f"keys: {', '.join(sorted(own - {'kind'}))}); another kind is chosen with teacher=KIND")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, "teacher.") from None


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Type-check `cfg` against the schema and range-check it. Raises ConfigError (one line)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    try:
        teacher = node.get("teacher")
        rest = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.masked_copy(node, [
            k for k in node if k != "teacher"]))
        rest.teacher = None
        rc: RunConfig = OmegaConf.to_object(rest)   # resolves interpolations; each section checks itself
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    rc.teacher = teacher_config(teacher)
    rc.check()
    return _plain_choices(rc)


def _plain_choices(obj: Any) -> Any:
    """The validated config with every Enum choice as its plain str value (a fingerprint, a JSON record
    or a YAML dump then holds the same type a user's file does); dataclasses edited in place."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, StrEnum):
            setattr(obj, f.name, str.__str__(value))
        elif hasattr(value, "__dataclass_fields__"):
            _plain_choices(value)
        elif isinstance(value, list):
            for item in value:
                if hasattr(item, "__dataclass_fields__"):
                    _plain_choices(item)
    return obj


def check_trainer_hardware(c: RunConfig) -> None:
    """Before training: trainer.accelerator / trainer.devices name hardware this machine has,
    and the data set gives every rank at least one batch. ConfigError (one line) otherwise."""
    import torch
    t = c.trainer
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if t.accelerator in ("gpu", "cuda") and gpus == 0:
        _fail("trainer.accelerator", str(t.accelerator), "this machine has no CUDA GPU; use auto or cpu")
    if t.accelerator == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        _fail("trainer.accelerator", str(t.accelerator), "this machine has no MPS device; use auto or cpu")
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


@dataclass
class SearchRunConfig(RunConfig):
    """The schema of `python -m dsno.search` (schema=search): a run plus the budget `nfe`."""

    nfe: int = 5


# ----------------------------------------------------------------------------------------- ConfigStore
def _open_options(node: DictConfig) -> DictConfig:
    """Let solver.options take new keys from the command line (solver.options.method=fast, no `+`):
    the solver registry checks them."""
    OmegaConf.set_struct(node.options, False)
    return node


def register_configs() -> None:
    """Store the schema and the registry-made group options in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from dsno.solvers import available
    from dsno.solvers import get as get_solver
    from dsno.teachers.registry import teacher_kinds

    cs = ConfigStore.instance()
    for name, cls in (("run", RunConfig), ("search", SearchRunConfig)):
        schema = OmegaConf.structured(cls)
        _open_options(schema.solver)
        cs.store(group="schema", name=name, node=schema, package="_global_")
    for name, kind in teacher_kinds().items():
        cs.store(group="teacher", name=name, node=OmegaConf.structured(kind.config))
    for name in available(None):
        spec = get_solver(name)
        if not spec.stochastic:
            node = _open_options(OmegaConf.structured(SolverConfig))
            node.name, node.order = name, spec.default_order
            cs.store(group="solver", name=name, node=node)
    cs.store(group="trainer", name="default", node=OmegaConf.structured(TrainerConfig))
    cs.store(group="logger", name="wandb", node=OmegaConf.structured(LoggerConfig))


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(*overrides: str, config_dir: str | os.PathLike | None = None) -> DictConfig:
    """The root config of conf/ (this checkout's, or config_dir) composed with `overrides`, as the
    entry points get it (the ConfigStore is filled first). Not validated: see `validate`."""
    from hydra import compose as hydra_compose, initialize_config_dir
    register_configs()
    with initialize_config_dir(config_dir=str(Path(config_dir or CONF_DIR).resolve()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
