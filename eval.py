"""Evaluate a trained DSNO sampler next to the solvers: `python eval.py experiment=mnist_gmm`.

Writes runs/<experiment>/eval/{metrics.json, report.md, *.png}."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from dsno.cli import prepare_cli, run_stage


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage("eval", cfg)


if __name__ == "__main__":
    prepare_cli(Path(__file__).resolve().parent / "conf", "eval")
    main()
