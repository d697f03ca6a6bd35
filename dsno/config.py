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
predictions) are read from it, never written here. `check_run(rc, stage)` then checks what this
machine and its files decide (hardware, weights files, writable folders, a W&B key) for every stage an
entry point reaches (STAGES); the entry points run both before anything is written (dsno.cli.Preflight).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import netrc
import os
import tempfile
from dataclasses import MISSING as MISSING_FACTORY, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence
from urllib.parse import urlparse

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dsno.checks import SEED_MAX, ConfigError, choice, count, fail, in_range
from dsno.errors import UserError
from dsno.run_files import solver_schedules_dir
from dsno.sampler import FORM_FILES
from dsno.schema import doc_field
from dsno.search.config import SearchConfig, check_search  # noqa: F401  (search.* of a run; public here)
from dsno.solvers import SPACINGS, available
from dsno.solvers import get as get_solver
from dsno.solvers.registry import OptionError, with_option
from dsno.teachers.config import ScheduleConfig, TeacherConfig, build_schedule  # noqa: F401  (public here)
from dsno.teachers.registry import teacher_kinds
from dsno.training.losses import KINDS
from dsno.training.perceptual import vgg_weights_path


# ----------------------------------------------------------------------------------------- choices
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


# ----------------------------------------------------------------------------------------- solver
@dataclass
class SolverChoice:
    """One solver and its settings: the type of the teacher solve (`solver`) and of every eval
    baseline (`eval.solvers[i]`). order None: the solver's default; options: its keyword options
    (`dsno.solvers.get(name).options`), settable as solver.options.KEY=VALUE."""

    name: str = doc_field(MISSING, "the solver (dsno.solvers.available())")
    order: Optional[int] = doc_field(None, "the solver's order; null: its default")
    options: Dict[str, Any] = doc_field(doc="the solver's keyword options, e.g. solver.options.variant=bh1",
                                        factory=dict)

    def check(self, at: str) -> None:
        choice(f"{at}.name", self.name, tuple(available(None)))
        try:
            get_solver(self.name).resolve(self.order, dict(self.options))
        except ValueError as e:
            fail(at, self.label(), str(e))

    def label(self) -> str:
        """'name-order key=value ...' (order omitted when it is the solver's default and not given)."""
        head = self.name if self.order is None else f"{self.name}-{self.order}"
        return head + "".join(f" {k}={v}" for k, v in self.options.items())

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `dsno.solve` for this choice (order included when given)."""
        return {**({} if self.order is None else {"order": self.order}), **self.options}


@dataclass
class SolverConfig(SolverChoice):
    """The teacher solve that makes DSNO's trajectories: a deterministic ODE solver on a grid."""

    name: str = doc_field("dpm_solver_pp", "the deterministic ODE solver that makes the teacher trajectories")
    steps: int = doc_field(60, "grid steps of the teacher solve; data.times are inserted into the grid")
    spacing: str = doc_field("logsnr", "how the solve's grid is spaced (one of dsno.solvers.SPACINGS)")
    t_end: float = doc_field(1e-3, "the time the solve ends at (the last of data.times)")
    solver_schedule: Optional[str] = doc_field(None, "solver=usf: the solver schedule YAML of python -m dsno.search "
                                               "(it fixes the grid)")

    def __post_init__(self) -> None:
        if self.name in available(None) and get_solver(self.name).stochastic:
            fail("solver.name", self.name, "the teacher solve must be deterministic (a probability-flow ODE "
                  "solver): DSNO learns the map from noise to the ODE's trajectory")
        self.check("solver")
        self.order = get_solver(self.name).resolve(self.order, {})[0]
        if self.options.get("method") == "fast":
            fail("solver.options.method", "fast", "the fast order mix returns no trajectory; use multistep or "
                  "singlestep")
        count("solver.steps", self.steps, 10_000, "the teacher solve needs no more; the float64 reference "
               "of eval uses eval.reference_steps")
        choice("solver.spacing", self.spacing, tuple(SPACINGS))
        in_range("solver.t_end", self.t_end, 0.0, 1.0, lo_open=True, hi_open=True)
        takers = with_option("solver_schedule")
        if self.solver_schedule is not None and self.name not in takers:
            fail("solver.solver_schedule", self.solver_schedule, f"applies to solver={'/'.join(takers)} only, not "
                  f"solver={self.name}")

    def solve_options(self) -> dict[str, Any]:
        """Every option of the teacher solve, defaults filled in: solver.options, and solver.solver_schedule
        when given (what `dsno.solve` and the solver's registry hooks get)."""
        given = {**self.options, **({} if self.solver_schedule is None else {"solver_schedule": self.solver_schedule})}
        return get_solver(self.name).resolve(self.order, given)[1]


# ----------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Teacher trajectories: x_T and the states at the M output times `times` (t_1 > ... > t_M = solver.t_end).

    verify: how shard bytes are trusted, in data_gen (shards already on disk, before resuming) and in
    training. quick: sizes and headers of every shard at start, then each shard's sha256 and finite
    values lazily, before any of its bytes reach a batch (a verified file version is recorded in
    <dir>/verified.json, so later runs skip unchanged files); full: read and verify every shard at
    start, ignoring verified.json; none: sizes and headers only."""

    dir: str = doc_field("${run_dir}/trajectories", "the folder of the teacher trajectories (shards + manifest.json)")
    num_trajectories: int = doc_field(4096, "how many teacher trajectories to make (noise x_T and its states)")
    shard_size: int = doc_field(1024, "trajectories per shard file (the unit written, verified and resumed)")
    batch_size: int = doc_field(512, "trajectories per teacher solve")
    times: List[float] = doc_field(doc="the M output times t_1 > ... > t_M the student learns (t_M = solver.t_end)",
                                   factory=lambda: [0.5625, 0.25, 0.0625, 0.001])
    repair: bool = doc_field(False, "read every shard (sha256, finite values, no cache), regenerate only bad ones")
    verify: VerifyMode = doc_field(VerifyMode.quick, "how shard bytes are trusted: quick (headers, then each shard's "
                                     "sha256 before use), full (all at start) or none")
    val_fraction: float = doc_field(0.05, "share of the trajectories held out for validation")
    num_workers: int = doc_field(0, "DataLoader worker processes (0: load in the training process)")
    precision: TeacherPrecision = doc_field(TeacherPrecision.fp32, "neural teachers: fp32 or bf16 autocast for the "
                                            "solve; exact ones stay float64")
    compile: bool = doc_field(False, "torch.compile the teacher network (default mode) for the solve")
    channels_last: bool = doc_field(False, "channels_last memory format for the teacher network")
    class_weights: Optional[List[float]] = doc_field(None, "conditional teachers: the weight of each class label "
                                                     "the trajectories are drawn with; null: the teacher's own")

    def __post_init__(self) -> None:
        if self.class_weights is not None:
            w = list(self.class_weights)
            if not w or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
                fail("data.class_weights", w, "must be finite numbers >= 0, one per class, not all 0")
        count("data.num_trajectories", self.num_trajectories, 10**12, "past any disk")
        count("data.shard_size", self.shard_size, 10**7, "a shard is written and verified whole; keep each "
               "well under memory")
        count("data.batch_size", self.batch_size, 65536, "larger solver batches only exhaust memory")
        in_range("data.val_fraction", self.val_fraction, 0.0, 0.5, hi_open=True)
        count("data.num_workers", self.num_workers, 256, "more loader processes than any machine has cores", lo=0)
        times = list(self.times)
        if len(times) < 1:
            fail("data.times", times, "needs at least 1 output time (M >= 1; M = 1 is plain distillation)")
        if len(times) > 256:
            fail("data.times", f"[{len(times)} times]", "at most 256 output times (each is one backbone branch)")
        if any(not math.isfinite(t) for t in times):
            fail("data.times", times, "must be finite numbers")
        if any(a <= b for a, b in zip(times, times[1:])):
            fail("data.times", times, "must be numbers in strictly decreasing order (t_1 > ... > t_M)")


# ----------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    type: BackboneType = doc_field(BackboneType.unet, "unet: a fresh UNet of the keys below; teacher: a copy of the "
                                   "teacher's network (the keys below are unused)")
    base_channels: int = doc_field(24, "channels of the UNet's first level")
    channel_mult: List[int] = doc_field(doc="channel multiplier per UNet level (one level per entry)",
                                        factory=lambda: [1, 2])
    num_res_blocks: int = doc_field(1, "residual blocks per UNet level")
    attn_resolutions: List[int] = doc_field(doc="feature-map sizes with self-attention", factory=lambda: [8])
    dropout: float = doc_field(0.0, "dropout probability in the residual blocks")

    def __post_init__(self) -> None:
        count("model.backbone.base_channels", self.base_channels, 4096, "wider than any image UNet")
        count("model.backbone.num_res_blocks", self.num_res_blocks, 32, "deeper than any image UNet")
        mult = list(self.channel_mult)
        if not mult or len(mult) > 8 or any(not 1 <= v <= 64 for v in mult):
            fail("model.backbone.channel_mult", mult, "must be a list of 1 to 8 integers in [1, 64]")
        if any(not 1 <= v <= 4096 for v in self.attn_resolutions):
            fail("model.backbone.attn_resolutions", list(self.attn_resolutions),
                  "must be a list of feature-map sizes (integers in [1, 4096])")
        in_range("model.backbone.dropout", self.dropout, 0.0, 1.0, hi_open=True)


@dataclass
class ModelConfig:
    """DSNO = UNet backbone + temporal Fourier layers after every residual unit.

    parameterization: denoised: branch m predicts a denoised image D_m, mapped to the state by the DDIM
    map from x_T (a copied teacher reads its own head); state: the state itself (dsno.nn.parameterization).
    denoise_time: tau_0, branch m's network runs at time tau_0 + t_m (T - tau_0) on x_T moved to that scale."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    modes: int = doc_field(2, "Fourier modes kept over the M time points, <= M // 2 + 1")
    sigma_data: float = doc_field(0.5, "data std used for the Gaussian-optimal skip connection")
    parameterization: Parameterization = doc_field(Parameterization.denoised, "what each branch predicts: denoised "
                                                   "(an image, mapped to the state by DDIM) or state (the state)")
    denoise_time: float = doc_field(0.5, "tau_0: branch m's network runs at time tau_0 + t_m (T - tau_0)")

    def __post_init__(self) -> None:
        count("model.modes", self.modes, 129, "M <= 256 output times keep at most 129 modes")
        in_range("model.sigma_data", self.sigma_data, 0.0, 1e3, lo_open=True)
        if self.parameterization == "state" and self.backbone.type == "teacher":
            fail("model.parameterization", "state", "a student copied from the teacher keeps the teacher's output "
                  "head (eps / x0 / v), not a state: use model.parameterization=denoised")


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    batch_size: int = doc_field(32, "trajectories per optimizer step")
    lr: float = doc_field(1e-3, "Adam learning rate after warmup")
    warmup_steps: int = doc_field(50, "steps of linear learning-rate warmup")
    ema_decay: float = doc_field(0.999, "decay of the weights' exponential moving average (the exported weights)")
    loss: str = doc_field("l2", "l2 | l1 | lpips, weighted per time point by clamp(sqrt(SNR), weight_min, weight_max)")
    perceptual_weights: Optional[str] = doc_field(None, "loss=lpips: local VGG-16 weights (torchvision's "
                                                  "vgg16-397923af.pth)")
    temporal_impl: TemporalImpl = doc_field(TemporalImpl.auto, "temporal layers: neuralop's SpectralConv (fft), the "
                                            "same map as a matrix, or auto")
    weight_min: float = doc_field(1.0, "the loss weight's lower clamp")
    weight_max: float = doc_field(1e4, "the loss weight's upper clamp")
    grad_clip: float = doc_field(1.0, "gradient-norm clip (0: none)")
    resume: bool = doc_field(True, "continue from checkpoints/last.ckpt when it exists (false: start over)")
    checkpoint_every: int = doc_field(100, "steps between checkpoints (what a resumed run starts from)")
    select: str = doc_field("best_val", "the EMA weights kept for export: best_val (those of the validation with the "
                            "lowest val/rmse_final on held-out trajectories) or last (those of the last step)")
    weight_decay: float = doc_field(0.0, "AdamW's decoupled weight decay (0: plain Adam)")
    fresh_per_step: int = doc_field(0, "of each step's train.batch_size trajectories, how many are fresh teacher "
                                    "solves on the training device (trajectories past data.num_trajectories, never "
                                    "stored nor held out; 0: stored ones only)")

    def __post_init__(self) -> None:
        from dsno.training.validation import SELECT  # deferred: loads Lightning only when used
        count("train.batch_size", self.batch_size, 65536, "larger batches only exhaust memory")
        in_range("train.lr", self.lr, 0.0, 1.0, lo_open=True)
        count("train.warmup_steps", self.warmup_steps, 10**9, "past any trainer.max_steps", lo=0)
        in_range("train.ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        choice("train.loss", self.loss, KINDS)
        if self.perceptual_weights is not None and not os.path.isfile(self.perceptual_weights):
            fail("train.perceptual_weights", self.perceptual_weights, "does not exist; give a local VGG-16 weights file")
        in_range("train.weight_max", self.weight_max, 0.0, 1e12, lo_open=True)
        in_range("train.weight_min", self.weight_min, 0.0, self.weight_max, lo_open=True)
        count("train.checkpoint_every", self.checkpoint_every, 10**9, "past any trainer.max_steps")
        in_range("train.grad_clip", self.grad_clip, 0.0, 1e12)
        choice("train.select", self.select, SELECT)
        in_range("train.weight_decay", self.weight_decay, 0.0, 1e3)
        count("train.fresh_per_step", self.fresh_per_step, self.batch_size, f"the fresh trajectories are part of "
              f"each step's train.batch_size={self.batch_size}", lo=0)


@dataclass
class TrainerConfig:
    """Passed to lightning.Trainer. accelerator=auto uses a GPU when present."""

    max_steps: int = doc_field(600, "optimizer steps of the training run")
    accelerator: Accelerator = doc_field(Accelerator.auto, "auto (a GPU when present), cpu, gpu, cuda or mps")
    devices: Any = doc_field("auto", "auto | -1 | a count | a list of device indices")
    num_nodes: int = doc_field(1, "machines of a multi-node run")
    strategy: str = doc_field("auto", "Lightning's strategy (auto, ddp, ...)")
    precision: str = doc_field("32-true", "training precision: 32-true, 32, bf16-mixed or 16-mixed")
    log_every_n_steps: int = doc_field(20, "steps between logged training scalars")
    val_check_interval: int = doc_field(250, "steps between validations (val loss, EMA sample grid)")

    def __post_init__(self) -> None:
        count("trainer.max_steps", self.max_steps, 10**9, "a billion optimizer steps is past any schedule")
        count("trainer.num_nodes", self.num_nodes, 4096, "more nodes than any cluster job")
        count("trainer.log_every_n_steps", self.log_every_n_steps, 10**9, "past any trainer.max_steps")
        count("trainer.val_check_interval", self.val_check_interval, 10**9, "past any trainer.max_steps")
        choice("trainer.precision", self.precision, TRAINER_PRECISIONS)


@dataclass
class LoggerConfig:
    kind: LoggerKind = doc_field(LoggerKind.wandb, "wandb (a W&B run per stage) or csv (logger=csv: CSV files only)")
    mode: LoggerMode = doc_field(LoggerMode.offline, "wandb: offline (upload later with wandb sync), online or "
                                 "disabled")
    project: str = doc_field("dsno", "wandb: the W&B project")


# ----------------------------------------------------------------------------------------- eval / export
def _default_eval_solvers() -> list[SolverChoice]:
    """Every solver family of the library, at its usual order; budgets a solver can't meet are skipped."""
    return [SolverChoice("ddim", 1), SolverChoice("deis", 3), SolverChoice("ipndm", 3),
            SolverChoice("dpm_solver", 3, {"method": "fast"}), SolverChoice("dpm_solver_pp", 3),
            SolverChoice("dpm_solver_pp", 3, {"shipped_3m": True}), SolverChoice("unipc", 3),
            SolverChoice("euler"), SolverChoice("heun"), SolverChoice("ddpm"), SolverChoice("sde_dpm_solver_pp", 2)]


@dataclass
class EvalConfig:
    num_samples: int = doc_field(256, "samples every method is scored on (the same noise for all)")
    batch_size: int = doc_field(256, "samples per batch")
    # every budget up to DSNO's equal-time cost (a few NFE on a CPU), then two far ones
    nfe: List[int] = doc_field(doc="the solvers' budgets (model evaluations) DSNO is compared at",
                               factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8, 10, 20])
    solvers: List[SolverChoice] = doc_field(doc="the baseline solvers: [{name, order, options}, ...]",
                                            factory=_default_eval_solvers)
    spacing: str = doc_field("logsnr", "the baselines' grid spacing (one of dsno.solvers.SPACINGS)")
    reference_steps: Optional[int] = doc_field(None, "steps of the float64 reference solve (DPM-Solver++ 3M) of the "
                                               "teacher's ODE; null: by the teacher's cost (500 closed-form, a "
                                               "network max(50, 5 x max(eval.nfe)) up to 500)")
    reference_rtol: float = doc_field(1e-7, "augmented teachers (PSLD): the adaptive DOP853 reference's rtol = atol")
    fidelity: bool = doc_field(True, "FID / KID / IS / precision-recall through torch-fidelity")
    fidelity_reference: Optional[str] = doc_field(None, "FID's real images, .npz of uint8 [N, H, W, C]; null: only "
                                                  "the project's digit teachers, against the shipped digits")
    inception_weights: Optional[str] = doc_field(None, "RGB teachers: local Inception weights file (else torch's hub "
                                                 "cache)")
    grid_samples: int = doc_field(64, "images in each sample grid (0: none)")
    trust_program: bool = doc_field(False, "open a pt2 / onnx sampler exported by another install")
    seed: int = doc_field(1234, "seed of eval's noise")
    timing_repeats: int = doc_field(3, "timed calls per method on one batch: the report reads their median and spread")

    def __post_init__(self) -> None:
        count("eval.num_samples", self.num_samples, 10**7, "ten million samples is past any FID protocol")
        count("eval.batch_size", self.batch_size, 65536, "larger batches only exhaust memory")
        count("eval.grid_samples", self.grid_samples, 1024, "a grid of more images is unreadable", lo=0)
        count("eval.seed", self.seed, SEED_MAX, "seeds are 64-bit signed integers", lo=0)
        if not self.nfe or any(n < 1 for n in self.nfe):
            fail("eval.nfe", list(self.nfe), "must be a non-empty list of positive integers")
        if max(self.nfe) > 1000:
            fail("eval.nfe", list(self.nfe), "each budget must be at most 1,000 model evaluations: beyond that a "
                  "solve is a reference, not a fast baseline (eval.reference_steps sets the reference)")
        for i, s in enumerate(self.solvers):
            s.check(f"eval.solvers[{i}]")
        choice("eval.spacing", self.spacing, tuple(SPACINGS))
        for key in ("fidelity_reference", "inception_weights"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(path):
                fail(f"eval.{key}", path, "does not exist; give a local file")
        if self.reference_steps is not None:
            count("eval.reference_steps", self.reference_steps, 10_000, "a float64 3rd-order solve converges long "
                   "before that")
        in_range("eval.reference_rtol", self.reference_rtol, 0.0, 1e-3, lo_open=True)
        count("eval.timing_repeats", self.timing_repeats, 1000, "the median settles long before that")


@dataclass
class ExportConfig:
    forms: List[str] = doc_field(doc="the sampler's forms: safetensors (weights), pt2 (torch.export), onnx",
                                 factory=lambda: ["safetensors", "pt2", "onnx"])

    def __post_init__(self) -> None:
        for f in self.forms:
            choice("export.forms", f, tuple(FORM_FILES))


# ----------------------------------------------------------------------------------------- the run
@dataclass
class RunConfig:
    """A whole run. `teacher` holds the dataclass of its kind (dsno.teachers.registry)."""

    experiment: str = doc_field(MISSING, "the recipe in conf/experiment/ (default mnist_unet_quick)")
    run_dir: str = doc_field("runs/${experiment}", "where every output of the run goes")
    seed: int = doc_field(0, "seed of training (the trajectories' noise is seeded by it too)")
    force: bool = doc_field(False, "train.py: run export and eval again even when the run is complete for this config")
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
        count("seed", self.seed, SEED_MAX, "seeds are 64-bit signed integers", lo=0)
        times = list(self.data.times)
        sched = self.teacher.fixed_schedule()
        if sched is not None and (times[0] > sched.T or times[-1] < sched.t_min):
            fail("data.times", times, f"must lie inside the schedule's time range [{sched.t_min:g}, {sched.T:g}]")
        if abs(times[-1] - self.solver.t_end) > 1e-12:
            fail("data.times", times, f"the last output time must equal solver.t_end ({self.solver.t_end:g})")
        t_max = sched.T if sched is not None else 1.0
        segments = len(times) if times[0] < t_max else len(times) - 1
        if self.solver.steps < segments:
            fail("solver.steps", self.solver.steps, f"must be at least {segments}: one step per segment between "
                  f"the {len(times)} output times (data.times) and the start time {t_max:g}")
        self._check_processes()
        self._check_solver_options(times)
        if self.train.select == "best_val" and self.data.val_fraction == 0:
            fail("train.select", self.train.select, "needs held-out trajectories: set data.val_fraction > 0, "
                  "or train.select=last")
        m = len(times)
        if self.model.modes > m // 2 + 1:
            fail("model.modes", self.model.modes, f"must be <= M // 2 + 1 = {m // 2 + 1} for M = {m} output times")
        in_range("model.denoise_time", self.model.denoise_time, 0.0, t_max, lo_open=True)
        check_search(self.search, None, sched.T if sched is not None else math.inf, self.solver.t_end)

    def _check_processes(self) -> None:
        """Every solver (the teacher solve, eval's baselines) integrates the teacher's kind of process;
        an augmented process (PSLD) has no log-SNR, so its grids are spaced in time."""
        process = type(self.teacher).process
        own = available(process)
        for key, solver in (("solver", self.solver), *((f"eval.solvers[{i}]", s) for i, s in enumerate(self.eval.solvers))):
            if solver.name not in own:
                fail(f"{key}.name", solver.name, f"integrates another kind of process than teacher kind "
                      f"{self.teacher.kind} ({process}); its solvers are: {', '.join(own)}")
        if process == "augmented":
            for key, spacing in (("solver.spacing", self.solver.spacing), ("eval.spacing", self.eval.spacing)):
                if spacing not in ("time_uniform", "time_quadratic"):
                    fail(key, spacing, f"teacher kind {self.teacher.kind} is an augmented process: use "
                          "time_uniform or time_quadratic")
            if self.model.parameterization != "state":
                fail("model.parameterization", str(self.model.parameterization), f"teacher kind "
                      f"{self.teacher.kind} has no scalar schedule to read a denoised output with: use state")

    def _check_solver_options(self, times: list) -> None:
        """The teacher solver's own checks of its options against this run (e.g. usf: its solver schedule)."""
        check = get_solver(self.solver.name).check
        if check is None:
            return
        try:
            check(self.solver.solve_options(), order=self.solver.order, t_end=self.solver.t_end, times=times)
        except OptionError as e:
            if e.value is OptionError.NO_VALUE:
                raise ConfigError(f"config error: solver.{e.option}: {e}") from None
            fail(f"solver.{e.option}", e.value, str(e))


# ----------------------------------------------------------------------------------------- validation
def _omegaconf_error(e: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    return ConfigError(f"config error: {prefix}{key}: {str(e).splitlines()[0]}")


def teacher_config(raw: Any) -> TeacherConfig:
    """The `teacher` block as its kind's dataclass (checked); ConfigError naming a key it lacks."""
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
    choice("teacher.kind", kind, tuple(kinds))
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


RENAMED_KEYS = {"solver.schedule": "solver.solver_schedule"}      # old config key -> its new name


def renamed_key_error(key: str) -> ConfigError | None:
    """The one-line error of a config key that was renamed (RENAMED_KEYS), naming the new one; else None."""
    return ConfigError(f"config error: {key} was renamed: use {RENAMED_KEYS[key]}") if key in RENAMED_KEYS else None


def refuse_renamed_keys(keys: Iterable[str]) -> None:
    """Raise the ConfigError of the first of `keys` that was renamed (RENAMED_KEYS)."""
    for key in keys:
        error = renamed_key_error(key)
        if error is not None:
            raise error


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys of command-line overrides (key=value, +key=value, ++key=value, ~key)."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def present_keys(node: DictConfig, keys: Iterable[str]) -> list[str]:
    """Those of the dotted `keys` that `node` holds (a null value counts)."""
    absent = object()
    return [k for k in keys if OmegaConf.select(node, k, default=absent) is not absent]


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Type-check `cfg` against the schema and range-check it. Raises ConfigError (one line)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    refuse_renamed_keys(present_keys(node, RENAMED_KEYS))
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
    """Before training: trainer.accelerator / devices / strategy / precision name hardware and a setup
    this machine has and Lightning accepts, data.num_workers fits its cores, and the data set gives every
    rank at least one batch. ConfigError (one line) otherwise."""
    t = c.trainer
    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if t.accelerator in ("gpu", "cuda") and gpus == 0:
        fail("trainer.accelerator", str(t.accelerator), "this machine has no CUDA GPU; train on the CPU with "
              "trainer.accelerator=cpu (or auto), or trainer=default for the whole CPU trainer")
    if t.accelerator == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        fail("trainer.accelerator", str(t.accelerator), "this machine has no MPS device; use auto or cpu")
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and gpus > 0)
    available = gpus if on_gpu else cores
    where = f"{gpus} GPU(s)" if on_gpu else f"{available} CPU core(s)"
    devices = t.devices
    if on_gpu and devices in (-1, "-1"):
        count = available
    elif devices in (-1, "-1") or isinstance(devices, (list, tuple)) and not on_gpu:
        fail("trainer.devices", devices, f"names GPUs, but this run trains on the CPU ({where}): give "
              f"trainer.devices=auto or a count of CPU processes (1..{available})")
    elif devices == "auto":
        count = available if on_gpu else 1
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        count = devices
    elif isinstance(devices, str) and devices.isdigit() and int(devices) >= 1:
        count = int(devices)
    elif isinstance(devices, (list, tuple)) and devices and all(isinstance(d, int) and d >= 0 for d in devices):
        count = len(devices)
        if max(devices) >= available:
            fail("trainer.devices", devices, f"names device index {max(devices)}, but this machine has {where}")
    else:
        fail("trainer.devices", devices, "must be auto, -1, a positive integer or a list of device indices")
    if count > available:
        fail("trainer.devices", devices, f"asks for {count} devices, but this machine has {where}")
    _check_strategy_and_precision(t, on_gpu)
    if c.data.num_workers > cores:
        fail("data.num_workers", c.data.num_workers, f"this machine has {cores} CPU core(s); use at most {cores}")
    world = count * t.num_nodes
    n = c.data.num_trajectories
    train_size = n - (0 if c.data.val_fraction == 0 else max(1, round(n * c.data.val_fraction)))
    fresh = c.train.fresh_per_step
    stored = c.train.batch_size - fresh         # stored trajectories a step; 0: the train split is not read
    if stored == 0:
        return
    batches = train_size // stored
    less = f" less train.fresh_per_step={fresh}" if fresh else ""
    if batches == 0:
        what = f"less train.fresh_per_step={fresh} leaves {stored} stored trajectories a step, which " if fresh else ""
        fail("train.batch_size", c.train.batch_size, f"{what}exceeds the {train_size} training "
              f"trajectories of data.num_trajectories={n} (data.val_fraction={c.data.val_fraction:g} held out); use "
              f"at most {train_size + fresh} or make more trajectories")
    if batches < world:
        fail("trainer.devices", devices, f"{world} ranks need at least {world} training batches, but "
              f"data.num_trajectories={c.data.num_trajectories} gives {batches} of train.batch_size="
              f"{c.train.batch_size}{less}; make more trajectories or use fewer devices")


def _check_strategy_and_precision(t: TrainerConfig, on_gpu: bool) -> None:
    """trainer.strategy is one Lightning has, bf16 runs on this GPU, and Lightning accepts the whole
    accelerator / devices / strategy / precision combination (its own check, run now, not at fit)."""
    from lightning.pytorch.strategies import StrategyRegistry  # deferred: loads Lightning only when used
    strategies = ("auto", *StrategyRegistry.available_strategies())
    choice("trainer.strategy", t.strategy, strategies)
    if on_gpu and t.precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        fail("trainer.precision", t.precision, f"{torch.cuda.get_device_name()} has no bfloat16; use 16-mixed "
              "or 32-true")
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector  # deferred: loads Lightning only when used
    try:
        _AcceleratorConnector(accelerator=str(t.accelerator), devices=t.devices, num_nodes=t.num_nodes,
                              strategy=t.strategy, precision=t.precision)
    except Exception as e:      # noqa: BLE001 - Lightning raises several types; each is a refused setup
        reason = " ".join(str(e).split()) or type(e).__name__
        fail("trainer", {k: getattr(t, k) for k in ("accelerator", "devices", "num_nodes", "strategy", "precision")},
              f"Lightning refuses this setup: {reason}")


# The stages each entry point reaches: train.py runs the pipeline (makes the data when missing, trains, exports,
# evaluates).
STAGES = {"data": ("data",), "pipeline": ("data", "train", "export", "eval"), "eval": ("eval",),
          "search": ("search",)}


RENAMED_STAGES = {"train": "pipeline"}     # an entry point's old stage name -> its new one


def check_stage(stage: str) -> None:
    """`stage` names an entry point's stage (a key of STAGES); else ValueError, naming the new name of a
    renamed one ("train" meant train.py's whole pipeline; the training stage proper is one step of it)."""
    if stage in RENAMED_STAGES:
        raise ValueError(f"stage {stage!r} was renamed: use {RENAMED_STAGES[stage]!r} (train.py's whole run: "
                         f"{', '.join(STAGES[RENAMED_STAGES[stage]])})")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")


def check_run(c: RunConfig, stage: str) -> None:
    """Before `stage` (a key of STAGES) writes anything: the values of every stage it reaches that this
    machine and its files decide (hardware, weights files, writable folders). ConfigError (one line)."""
    check_stage(stage)
    reached = STAGES[stage]
    if set(reached) & {"data", "train", "eval"}:       # each of them is a W&B run (or CSV log)
        _check_logger(c.logger)
    if "data" in reached:
        _check_creatable("data.dir", c.data.dir, c.run_dir)
    if "train" in reached:
        check_trainer_hardware(c)
        if c.train.loss == "lpips":
            try:
                vgg_weights_path(c.train.perceptual_weights)
            except UserError as e:
                fail("train.loss", c.train.loss, str(e))
    if "export" in reached:
        if "onnx" in c.export.forms and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
            fail("export.forms", list(c.export.forms), "onnx needs the packages onnx and onnxscript (pip install "
                  "onnx onnxscript); or drop onnx")
    if "eval" in reached and c.eval.fidelity:
        from dsno.metrics.fidelity import MIN_IMAGES      # torch-fidelity's import: eval's own, moved here
        if c.eval.num_samples < MIN_IMAGES:
            fail("eval.num_samples", c.eval.num_samples, f"FID / KID / IS need at least {MIN_IMAGES} samples; "
                  f"use eval.num_samples>={MIN_IMAGES} or eval.fidelity=false")
    if "search" in reached and c.search.out is not None:
        _check_creatable("search.out", c.search.out, c.run_dir)
    if "eval" in reached or ("search" in reached and c.search.out is None):
        solver_schedules_dir(c.run_dir)      # the run folder does not hold them under their old folder name


def _check_logger(lc: LoggerConfig) -> None:
    """logger=wandb needs the wandb package; mode=online an API key (WANDB_API_KEY or `wandb login`'s
    ~/.netrc entry), which W&B would otherwise ask for only after the data stage."""
    if lc.kind != "wandb" or lc.mode == "disabled":
        return
    if importlib.util.find_spec("wandb") is None:
        fail("logger.kind", str(lc.kind), "the wandb package is not installed (pip install wandb); or use logger=csv")
    if lc.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        try:
            entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            entry = None
        if not entry or not entry[2]:
            fail("logger.mode", str(lc.mode), f"W&B has no API key for {host}: run `wandb login` or set "
                  "WANDB_API_KEY; or log offline (logger.mode=offline, `wandb sync` uploads later)")


def _check_creatable(key: str, path: str, run_dir: str) -> None:
    """`path` is a folder, or can be made one: its nearest existing ancestor is a folder one can write to
    (nothing is left on disk). A path inside run_dir is left to the entry point's check of run_dir."""
    p = Path(os.path.abspath(path))
    if p.is_relative_to(os.path.abspath(run_dir)):
        return
    if p.exists() and not p.is_dir():
        fail(key, path, "is a file, not a folder; point it at a folder")
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        fail(key, path, f"cannot be made: {p} is a file, not a folder")
    try:            # a folder made and removed at once proves it (os.access passes anything for root)
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=p))
    except OSError as e:
        fail(key, path, f"cannot be written: {p} is not writable ({e.strerror or e}); point it at a folder you "
              "can write to")


@dataclass
class SearchRunConfig(RunConfig):
    """The schema of `python -m dsno.search` (schema=search): a run plus the budget `nfe`."""

    nfe: int = doc_field(5, "the budget (model evaluations) of the searched solver schedule")


# ----------------------------------------------------------------------------------------- help
def key_help(cfg: DictConfig | dict) -> dict[str, str]:
    """Every key of a composed config (dotted, in schema order) -> its one-line help (`doc_field`);
    "" for a key without one. The schema is RunConfig (SearchRunConfig when the config has `nfe`), the
    `teacher` block its kind's dataclass."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    kind = OmegaConf.select(node, "teacher.kind")
    teacher = teacher_kinds()[kind].config if kind in teacher_kinds() else TeacherConfig
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING_FACTORY else f.default
            if f.name == "teacher" and cls in (RunConfig, SearchRunConfig):
                walk(teacher, "teacher.")
            elif dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = _field_help(cls, f.name)

    walk(SearchRunConfig if "nfe" in node else RunConfig, "")
    return out


def _field_help(cls: type, name: str) -> str:
    """The help of field `name`: its own, or that of the first base class that documents it (a teacher kind
    redefines `kind` with its name as the default)."""
    for base in cls.__mro__:
        f = getattr(base, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return ""


# ----------------------------------------------------------------------------------------- ConfigStore
def _open_options(node: DictConfig) -> DictConfig:
    """Let solver.options take new keys from the command line (solver.options.method=fast, no `+`):
    the solver registry checks them."""
    OmegaConf.set_struct(node.options, False)
    return node


def register_configs() -> None:
    """Store the schema and the registry-made group options in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore  # deferred: loads Hydra only when used

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
    from hydra import compose as hydra_compose, initialize_config_dir  # deferred: loads Hydra only when used
    register_configs()
    refuse_renamed_keys(override_keys(overrides))
    with initialize_config_dir(config_dir=str(Path(config_dir or CONF_DIR).resolve()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
