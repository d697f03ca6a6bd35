"""Glue of `python -m dsno.search`: config checks before Hydra writes anything, then the search."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dsno.builders import build_teacher, state_shape
from dsno.cli import Preflight
from dsno.config import check_run, check_search, validate
from dsno.run_files import solver_schedules_dir
from dsno.search.loop import search
from dsno.stages.trajectories import class_weights

log = logging.getLogger("dsno")


def split(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """(validated RunConfig, nfe, SearchConfig) of a composed config; ConfigError on mistakes.
    search.* is typed as the run's `search` section (an experiment may size it)."""
    d = OmegaConf.to_container(cfg, resolve=False)
    d.pop("hydra", None)
    nfe = d.pop("nfe", None)
    rc = validate(OmegaConf.create(d))
    return rc, nfe, rc.search


class SearchPreflight(Preflight):
    """dsno.cli.Preflight of `python -m dsno.search`: the run config, and nfe and search.* against the
    budget and the teacher's time range (dsno.search.config.check_search), before Hydra writes anything."""

    def validated(self, config: DictConfig):
        rc, nfe, sc = split(config)
        sched = rc.teacher.fixed_schedule()
        check_search(sc, nfe, sched.T if sched is not None else math.inf, rc.solver.t_end)
        return rc


def label_weights(rc: Any, teacher: Any) -> list[float] | None:
    """A class-conditional teacher's label weights, those its trajectories are drawn with (data.class_weights,
    else the teacher's own, else uniform); None for an unconditional teacher."""
    if getattr(teacher, "num_classes", None) is None:
        return None
    return class_weights(rc, teacher)


def run(cfg: DictConfig) -> dict:
    """Build the teacher and search (a class-conditional one on labels drawn with `label_weights`, under
    teacher.guidance); prints the one-line summary, returns it."""
    logging.getLogger("dsno").setLevel(logging.INFO)
    rc, nfe, sc = split(cfg)
    check_run(rc, "search")
    if sc.threads:
        torch.set_num_threads(sc.threads)
    teacher = build_teacher(rc.teacher)
    out = Path(sc.out) if sc.out else solver_schedules_dir(rc.run_dir)
    result = search(teacher, nfe, sc, out, rc.solver.t_end, teacher.solve_dtype,
                    shape=state_shape(teacher), class_weights=label_weights(rc, teacher))
    c = result["cost"]
    print(f"wrote {result['path']}: RMSE {result['score']['rmse_verify']:.4g} on {sc.verify_batch} verify samples; "
          f"{c['wall_s']:.0f} s ({c['cpu_s']:.0f} s CPU), {c['teacher_calls']} teacher calls ({c['teacher_sample_evals']} sample evaluations), "
          f"{c['candidates_scored']} candidates scored, predictor Kendall tau {c['predictor_kendall_tau']}")
    return result
