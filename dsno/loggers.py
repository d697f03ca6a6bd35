"""Run loggers: one W&B run per stage of an experiment, or CSV files; and what a stage logs
besides scalars (artifacts, image grids, eval's table and pictures).

W&B runs of one experiment share a group (the experiment name) and carry their stage as the job
type (data / train / eval); offline by default (runs/<exp>/wandb/offline-run-*, `wandb sync` to
upload). The id of each stage's latest run is kept in <run_dir>/wandb/runs.json, so an eval run
started later names the training run it scores (config key `train_run_id`)."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from dsno.atomic import atomic_write_text, refuse_link
from dsno.config import RunConfig
from dsno.jsonfile import read_bookkeeping

STAGES = ("data", "train", "eval")
RUNS_FILE = Path("wandb") / "runs.json"


def _wandb_logger_type():
    from lightning.pytorch.loggers import WandbLogger  # deferred: loads Lightning only when used
    return WandbLogger


def is_wandb(logger: Any) -> bool:
    return logger is not None and isinstance(logger, _wandb_logger_type())


def stage_logger(rc: RunConfig, stage: str, config: dict[str, Any] | None = None):
    """A Lightning WandbLogger for `stage` of rc's experiment (group = experiment, job_type =
    stage, files under rc.run_dir/wandb), or None when logger=csv. The run starts on first use."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if rc.logger.kind != "wandb":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    run_dir = Path(rc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    refuse_link(run_dir / RUNS_FILE.parent)   # dsno names it: a link there would put runs.json elsewhere
    logger = _wandb_logger_type()(project=rc.logger.project, name=f"{rc.experiment}-{stage}", group=rc.experiment,
                                  job_type=stage, save_dir=str(run_dir), mode=rc.logger.mode,
                                  config={**(config or {}), "stage": stage})
    if logger._wandb_init.get("anonymous") is None:     # Lightning passes anonymous=None; wandb warns that it is unused
        logger._wandb_init.pop("anonymous", None)
    return logger


LIGHTNING_NOISE = ("\N{ELECTRIC LIGHT BULB} Tip:", "Detected KeyboardInterrupt")   # ads; Ctrl-C has the CLI's line


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith(LIGHTNING_NOISE)


def quiet_lightning() -> None:
    """Lightning's log lines once each, in the stage log's format: `import lightning` gives its logger a
    console handler of its own besides the root's (Hydra's), which printed each line twice. Its tips
    (install litlogger / litmodels) are dropped, and so is its deprecation warning about torch's pytree
    API (Lightning's own call, nothing a user can change)."""

    import lightning  # noqa: F401  (installs the handler this removes)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    root = logging.getLogger()
    package = logging.getLogger("lightning")
    if root.handlers and package.propagate:
        package.handlers = [h for h in package.handlers if type(h) is not logging.StreamHandler]
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningNoise) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLightningNoise())


def training_logger(rc: RunConfig, config: dict[str, Any] | None = None):
    """The train stage's logger: its W&B run, or a CSVLogger writing <run_dir>/logs/ (logger=csv)."""
    lg = stage_logger(rc, "train", config)
    if lg is None:
        from lightning.pytorch.loggers import CSVLogger  # deferred: loads Lightning only when used
        refuse_link(Path(rc.run_dir) / "logs")
        lg = CSVLogger(str(rc.run_dir), name="logs")
    return lg


def eval_logger(rc: RunConfig):
    """The eval stage's W&B run (None with logger=csv); its config names the training run it scores."""
    return stage_logger(rc, "eval", {"experiment": rc.experiment,
                                     "train_run_id": recorded_run(rc.run_dir, "train")})


def record_run(run_dir: str | os.PathLike, stage: str, logger: Any) -> None:
    """Note `logger`'s W&B run id as `stage`'s in <run_dir>/wandb/runs.json (no-op for other loggers)."""
    if not is_wandb(logger) or not getattr(logger.experiment, "id", None):
        return
    path = Path(run_dir) / RUNS_FILE
    runs = _read_runs(path)
    runs[stage] = logger.experiment.id
    atomic_write_text(path, json.dumps(runs, indent=2) + "\n")


def recorded_run(run_dir: str | os.PathLike, stage: str) -> str | None:
    """The W&B run id last recorded for `stage` in run_dir, or None."""
    return _read_runs(Path(run_dir) / RUNS_FILE).get(stage)


def _read_runs(path: Path) -> dict[str, str]:
    return {k: v for k, v in read_bookkeeping(path).items() if isinstance(v, str)}


def finish(logger: Any) -> None:
    """End a W&B run (the next stage's run can start in this process); no-op otherwise."""
    if is_wandb(logger) and getattr(logger, "_experiment", None) is not None:
        logger.experiment.finish()


def artifact_name(kind: str, experiment: str) -> str:
    """'sampler', 'mnist_gmm' -> 'sampler-mnist_gmm' (W&B allows letters, digits, '-', '_', '.')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{kind}-{experiment}")


def log_artifact(logger: Any, name: str, kind: str, path: str | os.PathLike) -> None:
    """Log a file or a folder as a W&B artifact of type `kind` (copied at once, so a later rewrite
    of the files does not change what `wandb sync` uploads); no-op for other loggers."""
    if not is_wandb(logger):
        return
    import wandb  # deferred: loads wandb only when used
    path = Path(path)
    art = wandb.Artifact(name, type=kind)
    if path.is_dir():
        art.add_dir(str(path))
    else:
        art.add_file(str(path))
    logger.experiment.log_artifact(art)


def image_grid(images: torch.Tensor, data_range=(-1.0, 1.0), nrow: int = 8, scale: int = 4):
    """[N, C, H, W] floats in data_range -> uint8 numpy [H', W', C] grid, each pixel scale x scale
    (a 16x16 digit becomes visible)."""
    import torchvision  # deferred: loads torchvision only when used
    from dsno.metrics.image_io import to_uint8  # deferred: loads torch-fidelity only when used
    grid = torchvision.utils.make_grid(images.float().cpu(), nrow=nrow, padding=1, pad_value=data_range[0])
    grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return to_uint8(grid, data_range).permute(1, 2, 0).numpy()


def log_image_grid(logger: Any, key: str, images: torch.Tensor, step: int | None = None) -> None:
    """Log one grid of `images` ([N, C, H, W] in [-1, 1]) under `key`; no-op for other loggers."""
    if is_wandb(logger) and len(images):
        logger.log_image(key=key, images=[image_grid(images)], step=step)


EVAL_COLUMNS = ["method", "nfe", "rmse_vs_reference", "sec_per_sample", "sec_per_sample_min", "sec_per_sample_max",
                "cost_teacher_evals", "cost_teacher_evals_min", "cost_teacher_evals_max", "fid", "kid", "kid_std",
                "is_mean", "precision", "recall"]


def eval_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The eval table's columns: EVAL_COLUMNS, with label_accuracy after the RMSE when a run was scored for it
    (a conditional digit teacher's)."""
    if not any(r.get("label_accuracy") is not None for r in rows):
        return list(EVAL_COLUMNS)
    at = EVAL_COLUMNS.index("rmse_vs_reference") + 1
    return [*EVAL_COLUMNS[:at], "label_accuracy", *EVAL_COLUMNS[at:]]


def log_eval(logger: Any, result: dict[str, Any], out: Path) -> None:
    """Eval's table of rows and its pictures under `out` (comparison.png, grids/*.png, plots)."""
    if not is_wandb(logger):
        return
    import wandb  # deferred: loads wandb only when used
    columns = eval_columns(result["rows"])
    table = [[r.get(c) for c in columns] for r in result["rows"] if "skipped" not in r]
    logger.log_table("eval/metrics", columns=columns, data=table)
    images = {f"eval/{p.stem}": p for p in sorted(out.glob("*.png"))}
    images.update({f"eval/grids/{p.stem}": p for p in sorted((out / "grids").glob("*.png"))})
    if images:
        logger.experiment.log({k: wandb.Image(str(p)) for k, p in images.items()})
