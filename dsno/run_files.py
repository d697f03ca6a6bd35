"""Where the training stage puts its files in a run folder (export, eval and train.py's completion
record read them from there): names relative to the run folder, or to its checkpoints/ folder; and
where python -m dsno.search puts the solver schedules that eval lists."""

from __future__ import annotations

import os
from pathlib import Path

from dsno.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"                  # Lightning's save_last file: what training resumes from
WEIGHTS_FILE, CONFIG_FILE = "dsno_ema.safetensors", "dsno_config.json"    # the student's EMA weights, build config
TRAIN_TIME_FILE = "train_time.json"            # what training cost, for eval's report
VALIDATION_FILE = "validation.json"            # held-out vs train-subset scores per validation, the kept step
CHECKPOINT_WEIGHTS = f"{CHECKPOINT_DIR}/{WEIGHTS_FILE}"
CHECKPOINT_CONFIG = f"{CHECKPOINT_DIR}/{CONFIG_FILE}"
SOLVER_SCHEDULES_DIR = "solver_schedules"      # python -m dsno.search's USF solver schedules, listed by eval
OLD_SOLVER_SCHEDULES_DIR = "schedules"         # their folder's name before it said which schedule it holds


def solver_schedules_dir(run_dir: str | os.PathLike) -> Path:
    """<run_dir>/solver_schedules. A run folder that still has them under the old name <run_dir>/schedules
    is refused in one line that says how to rename it (nothing there is read or written silently)."""
    new, old = Path(run_dir) / SOLVER_SCHEDULES_DIR, Path(run_dir) / OLD_SOLVER_SCHEDULES_DIR
    if old.is_dir():
        raise UserError(f"{old} is the old name of the folder of solver schedules: rename it "
                        f"(mv {old} {new}){' after merging it into the new one' if new.exists() else ''}")
    return new
