"""Train DSNO: `python train.py [experiment=mnist_gmm] [key=value ...]` runs the pipeline.

The stages of dsno.stages.pipeline: makes the teacher trajectories first if they are missing,
then trains, exports the one-pass sampler to runs/<experiment>/sampler and evaluates it
(runs/<experiment>/eval); each stage is a W&B run of the experiment's group (or logger=csv)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from dsno.cli import prepare_cli, run_stage


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage("pipeline", cfg)


if __name__ == "__main__":
    prepare_cli(Path(__file__).resolve().parent / "conf", "pipeline")
    main()
