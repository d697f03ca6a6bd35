"""Make (or resume, or repair with data.repair=true) the teacher trajectories of an experiment."""

import sys

import hydra
from omegaconf import DictConfig

from dsno.cli import run_stage, take_debug_flag


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage("data", cfg)


if __name__ == "__main__":
    # `--repair` is accepted as a shorthand for the override data.repair=true
    sys.argv = [a if a != "--repair" else "data.repair=true" for a in sys.argv]
    take_debug_flag()
    main()
