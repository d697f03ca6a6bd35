"""Search a USF solver schedule: `python -m dsno.search experiment=mnist_gmm nfe=5`.

Keys: nfe, and search.* (dsno.search.config.SearchConfig, which an experiment may size): search.mode=timesteps for the timestep-only
(GITS / LD3-style) baseline, search.pin_times=[...] for grids that must pass through given times
(e.g. data.times, to make DSNO's training data with solver=usf). A class-conditional teacher
(teacher=mnist_gmm_cond teacher.guidance=W) is searched on labels drawn with data.class_weights under
its guidance. Writes
<run_dir>/solver_schedules/nfe<N>.yaml (nfe<N>_timesteps.yaml) and resumes from <name>.scored.json."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dsno.cli import prepare_cli
from dsno.errors import report_errors
from dsno.search.cli import run


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with report_errors("the candidates scored so far are kept (<name>.scored.json beside the solver schedule); the "
                       "same command resumes from them"):
        run(cfg)


if __name__ == "__main__":
    sys.argv.insert(1, "schema=search")
    sys.argv.insert(1, "hydra.callbacks.preflight._target_=dsno.search.cli.SearchPreflight")
    prepare_cli(Path(__file__).resolve().parent.parent.parent / "conf", "search")
    main()
