"""The pipeline: the stages composed, data (made when missing) -> train -> export -> eval, each stage
its own W&B run of the experiment's group. `python train.py` runs the pipeline; "train" is its
training stage only."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from dsno import loggers
from dsno.builders import build_teacher, data_shape, state_shape, teacher_backbone_config
from dsno.config import ConfigError, RunConfig
from dsno.data import DatasetError, load_manifest
from dsno.export import export_run
from dsno.stages import completion, trajectories

log = logging.getLogger("dsno")

STEPS = ("data", "train", "export", "eval")


def dataset_complete(data_dir: Path) -> bool:
    try:
        return load_manifest(data_dir).complete
    except DatasetError:      # missing or unreadable: the teacher stage (re)makes or reports it
        return False


def make_data(rc: RunConfig, teacher=None, config: dict[str, Any] | None = None) -> Path:
    """The teacher stage: (re)make or resume rc's trajectories, log the manifest as a W&B artifact
    of a `data` run; return the data folder."""
    teacher = teacher if teacher is not None else build_teacher(rc.teacher)
    trajectories.generate(rc, teacher, state_shape(teacher))
    data_dir = Path(rc.data.dir)
    if int(os.environ.get("RANK", "0")) == 0:
        logger = loggers.stage_logger(rc, "data", config)
        try:
            loggers.log_artifact(logger, loggers.artifact_name("trajectories", rc.experiment), "dataset",
                                 data_dir / "manifest.json")
            loggers.record_run(rc.run_dir, "data", logger)
        finally:
            loggers.finish(logger)
    return data_dir


def check_student_source(rc: RunConfig, teacher) -> None:
    """Before any stage: model.backbone.type=teacher needs a teacher whose network the student can copy."""
    if rc.model.backbone.type == "teacher":
        try:
            teacher_backbone_config(teacher)
        except ValueError as e:
            raise ConfigError(f"config error: {e}") from None


def run(rc: RunConfig, config: dict[str, Any] | None = None, through: str = "eval") -> Path:
    """Run the pipeline's stages up to and including `through` (train | export | eval); returns the run dir.
    The trajectories are made first when missing or incomplete (or with data.repair=true). Stages
    already complete for this config are not run again (force=true: export and eval are).
    config: the composed config, recorded in each stage's W&B run."""
    from dsno.stages import evaluation, training  # deferred: loads Lightning only when used
    if through not in STEPS[1:]:
        raise ValueError(f"through must be one of {STEPS[1:]}, got {through!r}")
    run_dir = Path(rc.run_dir)
    teacher = build_teacher(rc.teacher)
    check_student_source(rc, teacher)
    if through == "eval":        # eval's input files are checked before any work
        evaluation.check_prerequisites(rc, data_shape(teacher))
    done = completed_stages(rc, through)
    if done == STEPS[1:STEPS.index(through) + 1]:
        log.info("%s is already complete for this config: nothing redone%s (force=true runs export and eval "
                 "again)", run_dir, f"; the report is {run_dir / 'eval' / 'report.md'}" if through == "eval" else "")
        return run_dir
    if done:
        log.info("%s already complete for this config in %s: not run again (force=true redoes export and eval)",
                 " and ".join(done), run_dir)
    if "train" not in done and (rc.data.repair or not dataset_complete(Path(rc.data.dir))):
        if not rc.data.repair:
            log.warning("trajectories missing or incomplete at %s: generating them first "
                        "(python -m data_gen experiment=%s)", rc.data.dir, rc.experiment)
        make_data(rc, teacher, config)

    logger = loggers.training_logger(rc, config)
    try:
        if "train" not in done:
            weights = training.run(rc, logger=logger, teacher=teacher)
            if weights is None:         # not rank 0: export and eval are rank 0's
                return run_dir
            loggers.record_run(run_dir, "train", logger)
            completion.mark_complete(rc, "train")
        if through == "train":
            return run_dir
        if "export" not in done:
            log.info("export: the sampler (%s) to %s", ", ".join(rc.export.forms), run_dir / "sampler")
            sampler = export_run(run_dir, forms=tuple(rc.export.forms))
            completion.mark_complete(rc, "export")
            loggers.log_artifact(logger, loggers.artifact_name("sampler", rc.experiment), "model", sampler)
    finally:
        loggers.finish(logger)
    if through == "eval":
        evaluation.run(rc)
        completion.mark_complete(rc, "eval")
        log.info("done: the report is %s", run_dir / "eval" / "report.md")
    return run_dir


def completed_stages(rc: RunConfig, through: str) -> tuple[str, ...]:
    """The leading stages up to `through` that are complete for rc's config (dsno.stages.completion):
    none with force=true, and training only while train.resume (train.resume=false starts over)."""
    done: list[str] = []
    for stage in STEPS[1:STEPS.index(through) + 1]:
        if rc.force or (stage == "train" and not rc.train.resume) or not completion.is_complete(rc, stage):
            break
        done.append(stage)
    return tuple(done)
