"""Every Hydra experiment composes and validates; each bad value gets its own one-line message."""

from pathlib import Path

import pytest
from conftest import CONF
from conftest import compose as _compose
from hydra.errors import ConfigCompositionException

from dsno.cli import composition_message
from dsno.config import ConfigError, validate

EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name, tmp_path):
    extra = []
    if name in ("cifar10_ddpm", "diffusers_quick"):   # need a local teacher folder: any existing path passes validation
        extra = [f"teacher.path={tmp_path}"]
    rc = validate(_compose(f"experiment={name}", *extra))
    assert rc.experiment == name
    assert rc.run_dir == f"runs/{name}"
    assert rc.data.dir == f"runs/{name}/trajectories"


def test_default_is_the_quick_neural_recipe_and_user_overrides_apply():
    rc = validate(_compose("run_dir=/tmp/x", "seed=7", "data.num_trajectories=128", "trainer.max_steps=3",
                           "eval.num_samples=16", "solver=deis", "solver.order=2", default_experiment=None))
    assert rc.experiment == "mnist_unet_quick" and rc.teacher.kind == "unet" and rc.eval.num_samples == 16
    assert (rc.model.backbone.type, rc.model.parameterization) == ("teacher", "denoised")
    assert (rc.run_dir, rc.seed, rc.data.num_trajectories, rc.trainer.max_steps, rc.eval.num_samples) == \
        ("/tmp/x", 7, 128, 3, 16)
    assert rc.data.dir == "/tmp/x/trajectories"
    assert (rc.solver.name, rc.solver.order) == ("deis", 2)


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        _compose("trainer.max_stepz=3")


def test_a_renamed_key_is_refused_in_one_line_naming_the_new_one(tmp_path, monkeypatch, capsys):
    """Every key of RENAMED_KEYS, in an override (set or added), a config dict or an experiment file, and on
    the command line (error: ..., exit 2); its new name is a key of the schema."""
    import shutil
    import sys

    from omegaconf import OmegaConf

    from dsno.cli import prepare_cli
    from dsno.config import RENAMED_KEYS, compose
    assert RENAMED_KEYS == {"solver.schedule": "solver.solver_schedule"}
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    absent = object()
    for old, new in RENAMED_KEYS.items():
        line = f"config error: {old} was renamed: use {new}"
        assert OmegaConf.select(_compose(), new, default=absent) is None       # the new key, unset
        for override in (f"{old}=x.yaml", f"+{old}=x.yaml"):
            with pytest.raises(ConfigError, match=f"^{line}$"):
                _compose(override)
        config = OmegaConf.create(OmegaConf.to_container(_compose()))
        OmegaConf.update(config, old, "x.yaml", force_add=True)
        with pytest.raises(ConfigError, match=f"^{line}$"):
            validate(config)
        section, key = old.rsplit(".", 1)
        (conf / "experiment" / "old.yaml").write_text(f"# @package _global_\ndefaults:\n  - mnist_gmm\n"
                                                      f"{section}:\n  {key}: x.yaml\n")
        with pytest.raises(ConfigCompositionException) as e:
            compose("experiment=old", config_dir=conf)
        assert composition_message(e.value) == line
        monkeypatch.setattr(sys, "argv", ["train.py", f"{old}=x.yaml"])
        with pytest.raises(SystemExit) as exit_:
            prepare_cli(CONF, "pipeline")
        assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {line}\n"


BAD = [
    ("data.num_trajectories=-5", "data.num_trajectories=-5: must be a positive integer"),
    ("data.num_trajectories=abc", "data.num_trajectories=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("data.shard_size=0", "data.shard_size=0: must be a positive integer"),
    ("data.times=[0.5,0.7,0.001]", "data.times=[0.5, 0.7, 0.001]: must be numbers in strictly decreasing order"),
    ("data.times=[]", "data.times=[]: needs at least 1 output time"),
    ("data.times=[1.5,0.5,0.001]", "must lie inside the schedule's time range"),
    ("data.times=[0.5,0.25,0.01]", "the last output time must equal solver.t_end"),
    ("data.verify=sometimes", "data.verify=sometimes: Invalid value 'sometimes', expected one of [none, quick, full]"),
    ("data.val_fraction=0.9", "data.val_fraction=0.9: must lie in [0, 0.5)"),
    ("model.modes=4", "model.modes=4: must be <= M // 2 + 1 = 3 for M = 4 output times"),
    ("model.modes=0", "model.modes=0: must be a positive integer"),
    ("model.backbone.channel_mult=[1,0]", "model.backbone.channel_mult=[1, 0]"),
    ("model.backbone.type=transformer", "Invalid value 'transformer', expected one of [unet, teacher]"),
    ("solver.name=rk45", "solver.name='rk45': must be one of"),
    ("solver.spacing=cubic", "solver.spacing='cubic': must be one of"),
    ("solver.steps=0", "solver.steps=0: must be a positive integer"),
    ("solver.order=7", "solver='dpm_solver_pp-7': solver 'dpm_solver_pp' has orders 1..3"),
    ("solver=ddpm", "Could not find 'solver/ddpm'; Available options in 'solver': augmented_euler, csps_d, ddim"),
    ("solver.name=ddpm", "solver.name='ddpm': the teacher solve must be deterministic"),
    ("solver.options.warp=2", "solver 'dpm_solver_pp' has no option 'warp'"),
    ("eval.solvers=[{name:unipc,order:9}]", "eval.solvers[0]="),
    ("solver.t_end=0", "solver.t_end=0.0: must lie in (0, 1)"),
    ("train.lr=-1", "train.lr=-1.0: must lie in (0, 1]"),
    ("train.ema_decay=1.5", "train.ema_decay=1.5: must lie in [0, 1)"),
    ("train.loss=huber", "train.loss='huber': must be one of l2, l1"),
    ("train.batch_size=0", "train.batch_size=0: must be a positive integer"),
    ("trainer.max_steps=0", "trainer.max_steps=0: must be a positive integer"),
    ("trainer.precision=8-bit", "trainer.precision='8-bit': must be one of"),
    ("logger.kind=tensorboard", "Invalid value 'tensorboard', expected one of [wandb, csv]"),
    ("logger.mode=maybe", "Invalid value 'maybe', expected one of [offline, online, disabled]"),
    ("eval.nfe=[1,0]", "eval.nfe=[1, 0]: must be a non-empty list of positive integers"),
    ("eval.num_samples=0", "eval.num_samples=0: must be a positive integer"),
    ("eval.solvers=[{name:magic}]", "eval.solvers[0].name='magic': must be one of"),
    ("teacher.kind=gan", "teacher.kind='gan': must be one of"),
    ("teacher.schedule.beta_min=30", "teacher.schedule.beta_max=20.0: must exceed teacher.schedule.beta_min (30.0)"),
    ("teacher=unet teacher.prediction=score", "teacher.prediction='score': must be one of eps, x0, v"),
    ("teacher.prediction=eps", "Could not override 'teacher.prediction': Key 'prediction' not in 'MnistGMMConfig'"),
    ("export.forms=[tflite]", "export.forms='tflite': must be one of safetensors, pt2, onnx"),
    # non-finite floats, out-of-range seeds and counts: each names its own key and the bound's reason
    ("data.times=[0.5,nan,0.001]", "data.times=[0.5, nan, 0.001]: must be finite numbers"),
    ("data.times=[0.5,inf,0.001]", "data.times=[0.5, inf, 0.001]: must be finite numbers"),
    ("seed=-1", "seed=-1: must be an integer >= 0"),
    ("seed=9223372036854775808", "seed=9223372036854775808: must be at most 9,223,372,036,854,775,807"),
    ("solver.steps=3", "solver.steps=3: must be at least 4: one step per segment between the 4 output times"),
    ("solver.steps=100000", "solver.steps=100000: must be at most 10,000"),
    ("train.grad_clip=nan", "train.grad_clip=nan: must be a finite number"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0: must lie in [0, 1e+12]"),
    ("train.weight_max=nan", "train.weight_max=nan: must be a finite number"),
    ("train.lr=nan", "train.lr=nan: must be a finite number"),
    ("teacher.schedule.beta_min=-1", "teacher.schedule.beta_min=-1.0: must lie in (0, 10000]"),
    ("teacher.schedule.beta_max=nan", "teacher.schedule.beta_max=nan: must be a finite number"),
    ("trainer.accelerator=tpu9", "Invalid value 'tpu9', expected one of [auto, cpu, gpu, cuda, mps]"),
    ("eval.nfe=[1000000000]", "eval.nfe=[1000000000]: each budget must be at most 1,000 model evaluations"),
    ("eval.grid_samples=-5", "eval.grid_samples=-5: must be an integer >= 0"),
    ("eval.num_samples=100000000000", "eval.num_samples=100000000000: must be at most 10,000,000"),
    ("eval.reference_steps=1000000", "eval.reference_steps=1000000: must be at most 10,000"),
    ("eval.reference_rtol=0", "eval.reference_rtol=0.0: must lie in (0, 0.001]"),
    ("trainer.max_steps=10000000000", "trainer.max_steps=10000000000: must be at most 1,000,000,000"),
    ("model.backbone.attn_resolutions=[banana]", "Value 'banana' of type 'str' could not be converted to Integer"),
    ("model.backbone.base_channels=100000", "model.backbone.base_channels=100000: must be at most 4,096"),
    ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
    ("train.batch_size=1000000", "train.batch_size=1000000: must be at most 65,536"),
]


def config_error(*overrides: str) -> str:
    """The one line a user gets for these overrides: a schema error while Hydra composes (a wrong
    type, a value outside an Enum, a key the section lacks), or a range / cross-field error of validate."""
    try:
        validate(_compose(*overrides))
    except ConfigError as e:
        return str(e)
    except ConfigCompositionException as e:
        return composition_message(e)
    raise AssertionError(f"{overrides} was accepted")


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_give_one_clear_line(override, message):
    text = config_error(*override.split(" "))
    assert message in text, text
    assert "\n" not in text


def test_missing_teacher_path_is_named():
    with pytest.raises(ConfigError, match="teacher.path='/nonexistent/ddpm': does not exist"):
        validate(_compose("experiment=cifar10_ddpm", "teacher.path=/nonexistent/ddpm"))
