"""The training stage: trajectories in (made first if missing), a DSNO checkpoint and sampler out."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L

from dsno.builders import build_student, build_teacher, sample_shape
from dsno.atomic import atomic_path, atomic_write_text
from dsno.config import RunConfig, check_trainer_hardware
from dsno.errors import UserError
from dsno.stages import trajectories
from dsno.training.checkpoint_io import AtomicCheckpointIO
from dsno.training.data import StepTrajectoryData
from dsno.training.losses import build_loss, time_weights
from dsno.training.module import DSNOModule

log = logging.getLogger("dsno")


def _dataset_complete(data_dir: Path) -> bool:
    from dsno.data import DatasetError, load_manifest
    try:
        return load_manifest(data_dir).complete
    except DatasetError:      # missing or unreadable: the teacher stage (re)makes or reports it
        return False


def make_logger(rc: RunConfig, run_dir: Path, config: dict[str, Any]):
    if rc.logger.kind == "csv":
        return L.pytorch.loggers.CSVLogger(str(run_dir), name="logs")
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger
    lg = WandbLogger(project=rc.logger.project, name=rc.experiment, save_dir=str(run_dir), mode=rc.logger.mode,
                     config=config)
    return lg


def make_trainer(rc: RunConfig, run_dir: Path, logger, extra_callbacks=()) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint
    # the EMA copy is kept in eval mode on purpose; Lightning would warn about it at every start
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    ckpt = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                           every_n_train_steps=rc.train.checkpoint_every)
    t = rc.trainer
    return L.Trainer(max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                     strategy=t.strategy, precision=t.precision, logger=logger,
                     callbacks=[ckpt, *extra_callbacks], log_every_n_steps=t.log_every_n_steps,
                     val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
                     gradient_clip_val=rc.train.grad_clip or None, use_distributed_sampler=False,
                     enable_model_summary=False, default_root_dir=str(run_dir), num_sanity_val_steps=0,
                     plugins=[AtomicCheckpointIO()])


def save_student(module: DSNOModule, config: dict[str, Any], ckpt_dir: Path) -> Path:
    """Write the EMA weights (safetensors) and build config (JSON) atomically; return the weights path."""
    from safetensors.torch import save_file
    w, c = ckpt_dir / "dsno_ema.safetensors", ckpt_dir / "dsno_config.json"
    with atomic_path(w) as tmp:
        save_file(module.ema_state_dict(), str(tmp))
    atomic_write_text(c, json.dumps(config, indent=2))
    return w


def run(rc: RunConfig, config_for_logging: dict[str, Any] | None = None, evaluate: bool = True) -> Path:
    """Train DSNO for `rc`; then export the sampler and (optionally) evaluate. Returns the run dir."""
    check_trainer_hardware(rc)
    run_dir = Path(rc.run_dir)
    L.seed_everything(rc.seed, workers=True, verbose=False)
    teacher = build_teacher(rc.teacher)
    shape = sample_shape(teacher, rc.teacher)
    if rc.train.loss == "lpips":            # the VGG weights file is checked before any work
        from dsno.training.perceptual import vgg_weights_path
        vgg_weights_path(rc.train.perceptual_weights)
    if evaluate:
        from dsno.stages.evaluation import check_prerequisites
        check_prerequisites(rc, shape)
    data_dir = Path(rc.data.dir)
    if rc.data.repair or not _dataset_complete(data_dir):
        if not rc.data.repair:
            log.warning("trajectories missing or incomplete at %s: generating them first "
                        "(python -m data_gen experiment=%s)", data_dir, rc.experiment)
        trajectories.generate(rc, teacher, shape)
    expected = trajectories.expected_fingerprint(rc, teacher, shape)

    model, config = build_student(rc, teacher, shape)
    weights = time_weights(teacher.schedule, rc.data.times, rc.train.weight_min, rc.train.weight_max)
    module = DSNOModule(model, build_loss(weights, rc.train.loss, rc.train.perceptual_weights), rc.train.lr,
                        rc.train.warmup_steps, rc.train.ema_decay, rc.train.temporal_impl)
    data = StepTrajectoryData(rc.data.dir, rc.train.batch_size, num_workers=rc.data.num_workers,
                              val_fraction=rc.data.val_fraction, seed=rc.seed, expected_fingerprint=expected,
                              verify=rc.data.verify)
    trainer = make_trainer(rc, run_dir, make_logger(rc, run_dir, config_for_logging or {}))
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if rc.train.resume and last.is_file() else None
    if ckpt_path:
        log.warning("resuming from %s", last)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except RuntimeError as e:
        if ckpt_path and "Error(s) in loading state_dict" in str(e):
            raise UserError(f"{last} was written by a run with another model config; use another "
                            "run_dir or train.resume=false to start over") from e
        raise
    if trainer.global_rank != 0:
        return run_dir
    save_student(module, config, run_dir / "checkpoints")
    from dsno.export import export_sampler
    module.ema.shadow.cpu()
    export_sampler(module.ema.shadow, config, run_dir / "sampler", forms=tuple(rc.export.forms))
    if evaluate:
        from dsno.stages import evaluation
        evaluation.run(rc, logger=trainer.logger)
    return run_dir

