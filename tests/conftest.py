import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# this test session's own signing key (dsno.trust.checksums), so tests never touch ~/.config
os.environ.setdefault("DSNO_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="dsno-key-"), "signing.key"))
# tiny tensors: one thread is as fast, and avoids OpenMP oversubscription when the machine is shared
torch.set_num_threads(1)

CONF = str(Path(__file__).resolve().parent.parent / "conf")

# A whole run small enough for a test: 64 trajectories, an 8-channel backbone, a few steps.
TINY_RUN = [
    "experiment=mnist_gmm", "data.num_trajectories=64", "data.shard_size=32", "data.batch_size=32", "solver.steps=12",
    "model.backbone.base_channels=8", "model.backbone.attn_resolutions=[]", "train.batch_size=8",
    "train.warmup_steps=2", "trainer.max_steps=6", "train.checkpoint_every=1", "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1", "logger=csv", "eval.num_samples=8", "eval.nfe=[1,2,3]",
    "eval.fidelity=false", "eval.reference_steps=60", "eval.grid_samples=8", "export.forms=[safetensors]",
]


def compose(*overrides, default_experiment: str | None = "mnist_gmm"):
    """The composed root config; tests run on the exact mixture teacher unless they name an experiment
    (default_experiment=None composes what a user's bare `python train.py` gets)."""
    from dsno.config import compose as compose_config
    overrides = list(overrides)
    if default_experiment and not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, f"experiment={default_experiment}")
    return compose_config(*overrides, config_dir=CONF)


@pytest.fixture
def tiny_run(tmp_path):
    """A validated RunConfig of a tiny mnist_gmm run in tmp_path (extra overrides appended)."""
    from dsno.config import validate

    def make(*extra, run_dir=None):
        return validate(compose(f"run_dir={run_dir or tmp_path / 'run'}", *TINY_RUN, *extra))
    return make
