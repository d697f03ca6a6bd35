"""Shared glue for the Hydra entry points (train.py, eval.py, python -m data_gen)."""

from __future__ import annotations

import logging
import os
import sys

from omegaconf import DictConfig, OmegaConf

from dsno.config import ConfigError, validate

log = logging.getLogger("dsno")


def run_stage(stage: str, cfg: DictConfig) -> None:
    """Validate `cfg`, then run `stage` (data | train | eval). Config and input errors exit with
    status 2 and one line on stderr, before any work starts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.getLogger("dsno").setLevel(logging.INFO)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        rc = validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from dsno.data import DatasetError
    try:
        if stage == "data":
            from dsno.builders import build_teacher, sample_shape
            from dsno.stages.trajectories import generate
            teacher = build_teacher(rc.teacher)
            generate(rc, teacher, sample_shape(teacher, rc.teacher))
            log.info("trajectories ready in %s", rc.data.dir)
        elif stage == "train":
            from dsno.stages.training import run
            run(rc, config_for_logging=OmegaConf.to_container(cfg, resolve=True))
        elif stage == "eval":
            from dsno.stages.evaluation import run
            result = run(rc)
            log.info("wrote %s/eval/report.md (%d rows)", rc.run_dir, len(result["rows"]))
        else:
            raise ValueError(f"unknown stage {stage!r}")
    except (DatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
