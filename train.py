"""Train DSNO: `python train.py [experiment=mnist_gmm] [key=value ...]`.

Makes the teacher trajectories first if they are missing, then trains, exports the one-pass
sampler to runs/<experiment>/sampler and evaluates it (runs/<experiment>/eval)."""

import hydra
from omegaconf import DictConfig

from dsno.cli import run_stage, take_debug_flag


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage("train", cfg)


if __name__ == "__main__":
    take_debug_flag()
    main()
