"""Shared glue for the Hydra entry points (train.py, eval.py, python -m data_gen).

Every user mistake (a `dsno.errors.UserError`: a config value, a missing or foreign file, a
corrupt data set) ends the run with one line `error: ...` on stderr and exit status 2;
`HYDRA_FULL_ERROR=1` or `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dsno.atomic import prove_writable
from dsno.config import check_run, check_stage, compose, key_help, register_configs, renamed_key_error, validate
from dsno.errors import UserError, debug_requested, one_line, report_errors
from dsno.stages.pipeline import make_data, run
from dsno.teachers.registry import teacher_kinds

log = logging.getLogger("dsno")


def prepare_cli(config_dir: str | os.PathLike, stage: str) -> None:
    """Before a Hydra entry point runs: take `--debug` out of sys.argv (Hydra would reject it;
    it turns on full tracebacks), tell the Preflight callback which `stage` (dsno.config.STAGES) the
    run reaches, and compose the overrides once, so that an unknown key or a malformed override is one
    line `error: ...` and exit status 2 instead of Hydra's report.
    Command lines with Hydra's own flags (-m, --cfg, --help, ...) are left to Hydra."""
    if "--debug" in sys.argv:
        sys.argv = [a for a in sys.argv if a != "--debug"]
        os.environ["HYDRA_FULL_ERROR"] = "1"
    Preflight.entry_stage = stage
    register_configs()
    overrides = sys.argv[1:]
    if "--help" in overrides or "-h" in overrides:
        print_help(config_dir, [a for a in overrides if not a.startswith("-")])
        sys.exit(0)
    if any(a.startswith("-") for a in overrides):
        return
    try:
        compose(*overrides, config_dir=config_dir)
    except (HydraException, OmegaConfBaseException, UserError) as e:
        if debug_requested():
            raise
        print(f"error: {composition_message(e)}", file=sys.stderr)
        sys.exit(2)


def print_help(config_dir: str | os.PathLike, overrides: list[str]) -> None:
    """`--help`: every key of the config these overrides compose, with its value and its one-line help
    (`dsno.config.key_help`); Hydra's own flags stay under --hydra-help."""
    script = Path(sys.argv[0]).resolve()
    root = Path(config_dir).resolve().parent
    prog = (f"-m {'.'.join(script.parent.relative_to(root).parts)}" if script.name == "__main__.py"
            and script.is_relative_to(root) else script.name)
    try:
        cfg = compose(*overrides, config_dir=config_dir)
    except (HydraException, OmegaConfBaseException, UserError) as e:
        print(f"error: {composition_message(e)}", file=sys.stderr)
        sys.exit(2)
    experiments = sorted(p.stem for p in (Path(config_dir) / "experiment").glob("*.yaml"))
    lines = [f"usage: python {prog} [experiment=NAME] [key=value ...]   (--hydra-help: Hydra's own flags)",
             f"  experiment=NAME  {', '.join(experiments)}",
             f"  teacher=KIND     {', '.join(teacher_kinds())} (each with its own teacher.* keys)",
             "  solver=NAME      any deterministic solver of dsno.solvers.available()",
             "  logger=csv, trainer=gpu",
             "", "keys, with this command's values (--cfg job prints the whole composed config):"]
    rows = [(key, _shown(OmegaConf.select(cfg, key)), text) for key, text in key_help(cfg).items()]
    width = min(48, max(len(f"{k}={v}") for k, v, _ in rows))
    section = None
    for key, value, text in rows:
        if (key.split(".")[0] if "." in key else "") != section:
            section = key.split(".")[0] if "." in key else ""
            lines.append("")
        lines.append(f"  {f'{key}={value}':<{width}}  {text}")
    print("\n".join(lines))


def _shown(value: Any, limit: int = 40) -> str:
    """A config value as one short command-line token (lists and dicts as compact JSON, cut at `limit`)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False, enum_to_str=True)
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict, bool)) or value is None \
        else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def composition_message(e: BaseException) -> str:
    """One line for a Hydra / OmegaConf composition error: what failed (the override) and why (the
    schema's reason: a wrong type, a value outside an Enum's choices, an unknown key); a renamed key
    (dsno.config.RENAMED_KEYS), in an override or a config file, names its new name."""
    if isinstance(e, UserError):
        return one_line(e)
    cause = e.__cause__ or e.__context__
    for error in (e, cause):
        renamed = renamed_key_error(str(getattr(error, "full_key", "")))
        if renamed is not None:
            return one_line(renamed)
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    head = lines[0].rstrip(".")
    if lines[1:] and lines[1].startswith("Available options in"):      # a group option that does not exist
        options = [o for o in lines[2:] if not o.startswith(("Config search path", "provider="))]
        return f"{head}; {lines[1].rstrip(':')}: {', '.join(options)}"
    if cause is None or str(cause).strip() == "":
        return head
    why = str(cause).strip().splitlines()[0].strip()
    return head if why in head else f"{head}: {why}"


def check_writable(run_dir: str | os.PathLike) -> None:
    """Create `run_dir` if needed and prove a file can be written there; UserError otherwise."""
    path = Path(run_dir)
    try:
        prove_writable(path)
    except OSError as e:
        raise UserError(f"run_dir={path} is not writable ({e.strerror or e}); point run_dir= at a folder you "
                        "can write to") from None


class Preflight(Callback):
    """Hydra callback, run before Hydra creates any folder: validate the config, check every value of
    the stages `stage` reaches against this machine and its files (dsno.config.check_run), and prove
    run_dir writable, so a mistake is one line and leaves nothing on disk."""

    entry_stage = "pipeline"     # the running entry point's stage, set by prepare_cli

    def __init__(self, stage: str | None = None):
        self.stage = stage or Preflight.entry_stage

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def validated(self, config: DictConfig):
        """The RunConfig of the composed `config` (its `hydra` node left out); ConfigError on mistakes."""
        with open_dict(config):
            run_config = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        return validate(run_config)

    def _check(self, config: DictConfig) -> None:
        try:
            check_run(self.validated(config), self.stage)
            check_writable(OmegaConf.select(config, "run_dir"))
        except UserError as e:
            if debug_requested():
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)


ON_INTERRUPT = {      # what Ctrl-C leaves behind, by stage: the line after `interrupted: `
    "data": "the trajectory shards written so far are kept; the same command resumes from them",
    "pipeline": "the work so far is kept (trajectory shards, checkpoints/last.ckpt saved every train.checkpoint_every "
             "steps, the exported sampler); the same command resumes from it",
    "eval": "the trained run and its sampler are kept; the same command runs eval again",
}


def run_stage(stage: str, cfg: DictConfig) -> None:
    """Validate `cfg`, then run `stage` (data | pipeline | eval; pipeline: train.py's whole run of data, train,
    export and eval). User errors exit with status 2
    and one line on stderr; config errors do so before any work starts; Ctrl-C exits with status 130
    and one line saying what is kept."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.getLogger("dsno").setLevel(logging.INFO)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)   # "No CUDA runtime": any CPU machine
    check_stage(stage)
    with report_errors(ON_INTERRUPT[stage]):
        rc = validate(cfg)
        check_run(rc, stage)
        if stage == "data":
            make_data(rc, config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
            log.info("trajectories ready in %s", rc.data.dir)
        elif stage == "pipeline":       # data (when missing) -> train -> export -> eval
            run(rc, config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        elif stage == "eval":
            from dsno.stages import evaluation  # deferred: loads torch-fidelity only when used
            result = evaluation.run(rc)
            log.info("wrote %s/eval/report.md (%d rows)", rc.run_dir, len(result["rows"]))
        else:
            raise ValueError(f"stage {stage!r} has no entry point here; run_stage runs data, pipeline or eval")
