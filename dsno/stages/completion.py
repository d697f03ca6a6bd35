"""Which stages of a run are complete for its current config, so a rerun skips them.

After train, export and eval succeed, each records a stamp in <run_dir>/completed.json: a hash of the
config sections its output depends on (eval's stamp covers export's, export's covers train's). A stage
counts as complete when its stamp matches the current config and its output files are all there; a
changed key, a deleted output or `force=true` makes it (and every stage after it) run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from dsno.atomic import atomic_write_text
from dsno.config import RENAMED_KEYS, RunConfig
from dsno.jsonfile import read_bookkeeping
from dsno.run_files import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS

COMPLETED_FILE = "completed.json"
STAGES = ("train", "export", "eval")
# the config sections each stage's output depends on (cumulative: a later stage includes the earlier ones)
SECTIONS = {"train": ("seed", "teacher", "solver", "data", "model", "train", "trainer"),
            "export": ("export",), "eval": ("eval", "search")}
OUTPUTS = {"train": (CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG),
           "export": ("sampler",), "eval": ("eval/report.md", "eval/metrics.json")}
# how a stage reads or starts, not what it makes
NOT_OUTPUT_SHAPING = {("train", "resume"), ("data", "dir"), ("data", "repair"), ("data", "verify"),
                      ("data", "num_workers")}
# keys added after runs were first stamped: left out while at their default, so those runs stay complete
LATER_KEYS = {("data", "class_weights"): None, ("train", "select"): "best_val", ("train", "weight_decay"): 0.0,
              ("train", "fresh_per_step"): 0}


def stamp(rc: RunConfig, stage: str) -> str:
    """The hash of the config sections `stage`'s output depends on, this stage's and the earlier ones'."""
    keys = [k for s in STAGES[:STAGES.index(stage) + 1] for k in SECTIONS[s]]
    values = {k: _plain(getattr(rc, k)) for k in keys}
    for section, key in NOT_OUTPUT_SHAPING:
        values[section].pop(key, None)
    for (section, key), default in LATER_KEYS.items():
        if section in values and values[section].get(key, default) == default:
            values[section].pop(key, None)
    for old, new in RENAMED_KEYS.items():        # a renamed key is hashed under the name runs were stamped with
        (section, key), (_, old_key) = new.split("."), old.split(".")
        if section in values and key in values[section]:
            values[section][old_key] = values[section].pop(key)
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _recorded(run_dir: Path) -> dict[str, str]:
    return {k: v for k, v in read_bookkeeping(run_dir / COMPLETED_FILE).items() if isinstance(v, str)}


def is_complete(rc: RunConfig, stage: str) -> bool:
    """`stage` ran to the end with the config rc has now, and its outputs are still there."""
    run_dir = Path(rc.run_dir)
    return (_recorded(run_dir).get(stage) == stamp(rc, stage)
            and all((run_dir / rel).exists() for rel in OUTPUTS[stage]))


def mark_complete(rc: RunConfig, stage: str) -> None:
    """Record that `stage` finished with rc's config (and forget the later stages' records)."""
    run_dir = Path(rc.run_dir)
    done = {s: v for s, v in _recorded(run_dir).items() if s in STAGES[:STAGES.index(stage)]}
    done[stage] = stamp(rc, stage)
    atomic_write_text(run_dir / COMPLETED_FILE, json.dumps(done, indent=2) + "\n")
