"""Make (or resume, or repair with data.repair=true) the teacher trajectories of an experiment."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dsno.cli import prepare_cli, run_stage


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage("data", cfg)


if __name__ == "__main__":
    # `--repair` is accepted as a shorthand for the override data.repair=true
    sys.argv = [a if a != "--repair" else "data.repair=true" for a in sys.argv]
    prepare_cli(Path(__file__).resolve().parent.parent / "conf", "data")
    main()
