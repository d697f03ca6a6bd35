"""The training stage: a complete trajectory set in, a DSNO checkpoint out (checkpoints/last.ckpt
to resume from; the EMA weights kept by train.select, dsno_ema.safetensors, and their build config,
dsno_config.json, for export; validation.json: the held-out and train-subset scores of each validation
and the kept step). `dsno.stages.pipeline` composes it with the teacher stage, export and eval."""

from __future__ import annotations

import json
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger

from dsno.atomic import atomic_save_safetensors, atomic_write_text, refuse_link
from dsno.builders import build_student, build_teacher, state_shape
from dsno.config import RunConfig, check_trainer_hardware
from dsno.errors import UserError
from dsno.loggers import quiet_lightning
from dsno.run_files import (CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, TRAIN_TIME_FILE, VALIDATION_FILE,
                            WEIGHTS_FILE)
from dsno.stages import trajectories
from dsno.training.checkpoint_io import AtomicCheckpointIO
from dsno.training.data import StepTrajectoryData
from dsno.training.ema import EMA
from dsno.training.fresh import FreshSolveTime
from dsno.training.losses import build_loss, time_weights
from dsno.training.module import DSNOModule
from dsno.training.perceptual import vgg_weights_path
from dsno.training.validation import HeldOutValidation

log = logging.getLogger("dsno")



class TrainTime(L.Callback):
    """Writes `path` at the end of training: {"train_seconds": wall time of every fit of this run (a
    resumed fit adds its own to the recorded one), "train_steps": the optimizer steps reached}."""

    def __init__(self, path: Path):
        self.path, self.start, self.before = path, 0.0, 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start, self.before = time.perf_counter(), 0.0
        if trainer.global_step > 0 and self.path.is_file():
            try:
                self.before = float(json.loads(self.path.read_text())["train_seconds"])
            except (ValueError, KeyError, TypeError):
                self.before = 0.0

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            record = {"train_seconds": self.before + time.perf_counter() - self.start,
                      "train_steps": trainer.global_step}
            atomic_write_text(self.path, json.dumps(record))


class ProgressLog(L.Callback):
    """Without a terminal: one log line every `every` steps instead of a redrawn bar."""

    def __init__(self, every: int):
        self.every = max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == trainer.max_steps):
            loss = trainer.callback_metrics.get("train/loss")
            log.info("train: step %d/%d%s", step, trainer.max_steps,
                     "" if loss is None else f"  loss {float(loss):.4g}")


def progress_callback(rc: RunConfig, tty: bool | None = None) -> L.Callback:
    """Lightning's RichProgressBar on a terminal; else `ProgressLog` about 20 times a run."""
    if sys.stderr.isatty() if tty is None else tty:
        return RichProgressBar()
    return ProgressLog(rc.trainer.max_steps // 20)


def make_trainer(rc: RunConfig, run_dir: Path, logger, extra_callbacks=()) -> L.Trainer:
    refuse_link(run_dir / CHECKPOINT_DIR)   # dsno names it: a link there would put last.ckpt elsewhere
    quiet_lightning()
    ckpt = ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_DIR), save_last=True, save_top_k=0,
                           every_n_train_steps=rc.train.checkpoint_every)
    progress = progress_callback(rc)
    t = rc.trainer
    return L.Trainer(max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                     strategy=t.strategy, precision=t.precision, logger=logger,
                     callbacks=[ckpt, EMA(rc.train.ema_decay), progress, *extra_callbacks],
                     enable_progress_bar=not isinstance(progress, ProgressLog),
                     log_every_n_steps=t.log_every_n_steps,
                     val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
                     gradient_clip_val=rc.train.grad_clip or None, use_distributed_sampler=False,
                     enable_model_summary=False, default_root_dir=str(run_dir), num_sanity_val_steps=0,
                     plugins=[AtomicCheckpointIO()])


def save_student(weights: dict[str, torch.Tensor], config: dict[str, Any], ckpt_dir: Path) -> Path:
    """Write the EMA weights (safetensors) and build config (JSON) atomically; return the weights path."""
    w, c = ckpt_dir / WEIGHTS_FILE, ckpt_dir / CONFIG_FILE
    atomic_save_safetensors(w, weights)
    atomic_write_text(c, json.dumps(config, indent=2))
    return w


def run(rc: RunConfig, logger=None, teacher=None) -> Path | None:
    """Train DSNO for `rc` on its complete trajectory set (resuming from checkpoints/last.ckpt when
    train.resume); return the EMA weights' path, or None on ranks other than 0. `logger`: a
    Lightning logger (default: a CSVLogger under run_dir/logs); the caller ends it."""
    check_trainer_hardware(rc)
    run_dir = Path(rc.run_dir)
    L.seed_everything(rc.seed, workers=True, verbose=False)
    teacher = teacher if teacher is not None else build_teacher(rc.teacher)
    shape = state_shape(teacher)
    if rc.train.loss == "lpips":            # the VGG weights file is checked before any work
        vgg_weights_path(rc.train.perceptual_weights)
    expected = trajectories.expected_fingerprint(rc, teacher, shape)

    model, config = build_student(rc, teacher, shape)
    weights = time_weights(teacher.grid_schedule, rc.data.times, rc.train.weight_min, rc.train.weight_max)
    module = DSNOModule(model, build_loss(weights, rc.train.loss, rc.train.perceptual_weights), rc.train.lr,
                        rc.train.warmup_steps, rc.train.temporal_impl, rc.train.weight_decay)
    data = StepTrajectoryData(rc.data.dir, rc.train.batch_size, num_workers=rc.data.num_workers,
                              val_fraction=rc.data.val_fraction, seed=rc.seed, expected_fingerprint=expected,
                              verify=rc.data.verify, fresh_per_step=rc.train.fresh_per_step,
                              fresh_solve=partial(trajectories.teacher_solve, rc, teacher))
    if data.fresh is not None:
        log.info("train: %d of the %d trajectories of each step are fresh teacher solves on the training device "
                 "(trajectories %d onward of seed %d)", data.fresh.per_step, rc.train.batch_size,
                 data.fresh.stream.num_stored, data.fresh.stream.seed)
    if logger is None:
        logger = CSVLogger(str(run_dir), name="logs")
    validation = HeldOutValidation(rc.trainer.val_check_interval, rc.train.select,
                                   run_dir / CHECKPOINT_DIR / VALIDATION_FILE)
    callbacks = [TrainTime(run_dir / CHECKPOINT_DIR / TRAIN_TIME_FILE), validation]
    trainer = make_trainer(rc, run_dir, logger, callbacks + ([FreshSolveTime()] if data.fresh is not None else []))
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    ckpt_path = str(last) if rc.train.resume and last.is_file() else None
    if ckpt_path:
        log.warning("resuming from %s", last)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        if trainer.interrupted:     # Lightning turns Ctrl-C into exit status 1; the CLI reports it as Ctrl-C
            raise KeyboardInterrupt from None
        raise
    except RuntimeError as e:
        if ckpt_path and "Error(s) in loading state_dict" in str(e):
            raise UserError(f"{last} was written by a run with another model config; use another "
                            "run_dir or train.resume=false to start over") from e
        raise
    if trainer.global_rank != 0:
        return None
    return save_student(validation.kept_weights(trainer), config, run_dir / CHECKPOINT_DIR)
