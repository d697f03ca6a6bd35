"""Every value of every stage a run reaches is checked before the first stage starts: a mistake is
one line `error: config error: KEY=VALUE: ...`, exit status 2, and nothing under run_dir (not even
the folder). The cases run in-process through the entry points' Preflight callback (what train.py,
eval.py, python -m data_gen and python -m dsno.search run before Hydra writes anything); a few run
as real subprocesses."""

import os
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, compose
from dsno.cli import Preflight
from dsno.config import ConfigError, SearchConfig, check_run, validate
from dsno.search.cli import SearchPreflight
from test_bad_input import _cli, _one_line

CORES = os.cpu_count() or 1
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="these cases describe a machine without a GPU")


@pytest.fixture
def no_hub_weights(tmp_path, monkeypatch):
    """torch's hub cache is an empty folder: no VGG-16 or Inception weights are found there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def preflight_error(stage: str, run: Path, *overrides: str, capsys, preflight=Preflight, schema=()) -> str:
    """The one line stage's Preflight prints for `overrides` on a tiny run in `run` (exit status 2)."""
    cfg = compose(*schema, f"run_dir={run}", *TINY_RUN, *overrides)
    with pytest.raises(SystemExit) as e:
        preflight(stage).on_run_start(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config error: "), err
    return lines[0].removeprefix("error: ")


TRAIN = [   # (overrides, the message's start); each on a machine without a GPU
    (["trainer.devices=64"] if CORES < 64 else [f"trainer.devices={CORES + 1}"],
     f"trainer.devices={max(64, CORES + 1)}: asks for {max(64, CORES + 1)} devices, but this machine has {CORES} "
     "CPU core(s)"),
    (["trainer.devices=abc"], "trainer.devices='abc': must be auto, -1, a positive integer or a list of device "
     "indices"),
    (["trainer.devices=0"], "trainer.devices=0: must be auto, -1, a positive integer"),
    (["trainer.accelerator=gpu"], "trainer.accelerator='gpu': this machine has no CUDA GPU; train on the CPU with "
     "trainer.accelerator=cpu (or auto), or trainer=default for the whole CPU trainer"),
    (["trainer.accelerator=cuda"], "trainer.accelerator='cuda': this machine has no CUDA GPU"),
    (["trainer.accelerator=cpu", "trainer.devices=-1"], "trainer.devices=-1: names GPUs, but this run trains on "
     f"the CPU ({CORES} CPU core(s)): give trainer.devices=auto or a count of CPU processes (1..{CORES})"),
    (["trainer.devices=-1"], "trainer.devices=-1: names GPUs, but this run trains on the CPU"),
    (["trainer.devices=[0]"], "trainer.devices=[0]: names GPUs, but this run trains on the CPU"),
    (["trainer.strategy=banana"], "trainer.strategy='banana': must be one of auto, ddp"),
    (["trainer.strategy=fsdp"], "trainer={'accelerator': 'auto', 'devices': 'auto', 'num_nodes': 1, 'strategy': "
     "'fsdp', 'precision': '32-true'}: Lightning refuses this setup: The strategy `fsdp` requires a GPU"),
    (["train.batch_size=100"], "train.batch_size=100: exceeds the 61 training trajectories of "
     "data.num_trajectories=64 (data.val_fraction=0.05 held out)"),
    ([f"data.num_workers={CORES + 1}"], f"data.num_workers={CORES + 1}: this machine has {CORES} CPU core(s)"),
    (["train.loss=lpips"], "train.loss='lpips': VGG-16 weights for the perceptual loss not found at "),
    (["eval.fidelity=true", "eval.num_samples=9"], "eval.num_samples=9: FID / KID / IS need at least 10 samples; "
     "use eval.num_samples>=10 or eval.fidelity=false"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be a positive integer"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0: must be a positive integer"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0: must be a positive integer"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0: must be a positive integer"),
    (["trainer.precision=8-bit"], "trainer.precision='8-bit': must be one of 32-true, 32, bf16-mixed, 16-mixed"),
    (["train.lr=0"], "train.lr=0.0: must lie in (0, 1]"),
    (["train.ema_decay=1"], "train.ema_decay=1.0: must lie in [0, 1)"),
    (["train.loss=huber"], "train.loss='huber': must be one of l2, l1"),
    (["train.warmup_steps=-1"], "train.warmup_steps=-1: must be an integer >= 0"),
    (["train.weight_min=0"], "train.weight_min=0.0: must lie in (0, 10000]"),
    (["train.grad_clip=nan"], "train.grad_clip=nan: must be a finite number"),
    (["train.checkpoint_every=0"], "train.checkpoint_every=0: must be a positive integer"),
    (["train.perceptual_weights=/nonexistent/vgg.pth"], "train.perceptual_weights='/nonexistent/vgg.pth': does not "
     "exist; give a local VGG-16 weights file"),
    (["eval.fidelity_reference=/nonexistent/ref.npz"], "eval.fidelity_reference='/nonexistent/ref.npz': does not "
     "exist; give a local file"),
    (["search.seed=-5"], "search.seed=-5: must be an integer >= 0"),
    (["search.seed=10000000000000"], "search.seed=10000000000000: must be at most 9,223,344,366,821: the noise "
     "seeds 1,000,003 * seed + 1 and + 2 are 64-bit signed integers"),
    (["search.batch=100000000000"], "search.batch=100000000000: must be at most 65,536"),
    (["search.verify_batch=0"], "search.verify_batch=0: must be a positive integer"),
    (["search.mode=grid"], "search.mode='grid': must be one of full, timesteps"),
    (["search.base=euler"], "search.base='euler': must be one of unipc"),
    (["search.base=ddim", "search.base_order=2"], "search.base_order=2: must be at most 1"),
    (["search.afs=[]"], "search.afs=[]: must be a non-empty list of none, zero, mean"),
    (["search.explore=1.0"], "search.explore=1.0: must lie in [0, 1)"),
    (["search.refine=1000"], "search.refine=1000: must be at most 50"),
    (["search.threads=-1"], "search.threads=-1: must be an integer >= 0"),
    (["search.rounds=100000000"], "search.rounds=100000000: must be at most 10,000"),
    (["search.pin_times=[0.5,0.5]"], "search.pin_times=[0.5, 0.5]: must be distinct times"),
    (["search.pin_times=[2.0]"], "search.pin_times=[2.0]: must be distinct times strictly between t_end=0.001 "
     "and T=1"),
]


@no_gpu
@pytest.mark.parametrize("overrides,message", TRAIN, ids=[" ".join(c[0]) for c in TRAIN])
def test_train_checks_every_stage_before_writing(overrides, message, tmp_path, capsys, no_hub_weights):
    run = tmp_path / "run"
    assert preflight_error("pipeline", run, *overrides, capsys=capsys).startswith(f"config error: {message}")
    assert not run.exists()


def test_a_data_dir_that_cannot_be_made_is_named_by_data_and_train(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for stage in ("data", "pipeline"):
        line = preflight_error(stage, tmp_path / "run", f"data.dir={blocker}/trajectories", capsys=capsys)
        assert line == f"config error: data.dir='{blocker}/trajectories': cannot be made: {blocker} is a file, " \
                       "not a folder"
    line = preflight_error("data", tmp_path / "run", f"data.dir={blocker}", capsys=capsys)
    assert line == f"config error: data.dir='{blocker}': is a file, not a folder; point it at a folder"
    assert not (tmp_path / "run").exists()


@no_gpu
def test_each_entry_point_checks_only_the_stages_it_reaches(tmp_path):
    """data_gen and eval.py never train: a trainer or loss the machine cannot run does not stop them."""
    bad_trainer = ["trainer.devices=abc", "trainer.accelerator=gpu", "train.loss=lpips",
                   "train.perceptual_weights=null"]
    rc = validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN, *bad_trainer))
    for stage in ("data", "eval", "search"):
        check_run(rc, stage)
    with pytest.raises(ConfigError, match=r"^config error: trainer\.accelerator='gpu'"):
        check_run(rc, "pipeline")
    assert not (tmp_path / "run").exists()


def test_train_py_runs_the_pipeline_and_the_old_stage_name_is_refused_naming_it(tmp_path):
    """"train" is the training stage only: train.py's whole run (data, train, export, eval) is "pipeline"."""
    from dsno.cli import run_stage
    from dsno.config import STAGES
    assert STAGES["pipeline"] == ("data", "train", "export", "eval") and "train" not in STAGES
    assert 'run_stage("pipeline", cfg)' in (Path(__file__).resolve().parent.parent / "train.py").read_text()
    rc = validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN))
    line = r"^stage 'train' was renamed: use 'pipeline' \(train.py's whole run: data, train, export, eval\)$"
    with pytest.raises(ValueError, match=line):
        check_run(rc, "train")
    with pytest.raises(ValueError, match=line):
        run_stage("train", compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN))
    with pytest.raises(ValueError, match=r"^unknown stage 'export'; the stages are data, pipeline, eval, search$"):
        check_run(rc, "export")
    assert not (tmp_path / "run").exists()


def test_search_keys_and_budget_are_checked_by_the_search_entry_before_writing(tmp_path, capsys):
    run = tmp_path / "run"
    cases = [(["nfe=0"], "config error: nfe=0: must be an integer in 1..50"),
             (["nfe=3", "search.pin_times=[0.5,0.3,0.2]"],
              "config error: search.pin_times=[0.5, 0.3, 0.2]: 3 pinned times need nfe >= 4"),
             (["search.seed=-5"], "config error: search.seed=-5: must be an integer >= 0"),
             (["search.batch=100000000000"], "config error: search.batch=100000000000: must be at most 65,536"),
             ([f"search.out={tmp_path}/a-file/solver_schedules"],
              f"config error: search.out='{tmp_path}/a-file/solver_schedules': cannot be made: {tmp_path}/a-file is a file")]
    (tmp_path / "a-file").write_text("")
    for overrides, message in cases:
        line = preflight_error("search", run, *overrides, capsys=capsys, preflight=SearchPreflight,
                               schema=["schema=search"])
        assert line.startswith(message), line
    assert not run.exists()


def test_search_config_bounds_hold_for_library_callers_too():
    """dsno.search.search takes a SearchConfig: building one runs the same range checks."""
    with pytest.raises(ConfigError, match=r"^config error: search\.seed=-5: must be an integer >= 0$"):
        SearchConfig(seed=-5)
    with pytest.raises(ConfigError, match=r"^config error: search\.batch=100000000000: must be at most 65,536"):
        SearchConfig(batch=100_000_000_000)
    from dsno.search.loop import noise_seeds
    largest = SearchConfig(seed=(2**63 - 3) // 1_000_003).seed        # the bound: its noise seeds still fit
    assert max(noise_seeds(largest)) <= 2**63 - 1 < max(noise_seeds(largest + 1))
    torch.Generator().manual_seed(max(noise_seeds(largest)))


def test_a_student_copied_from_a_teacher_without_network_fails_before_data(tmp_path, capsys):
    """model.backbone.type=teacher needs the teacher loaded to know; still before the data stage."""
    from dsno.cli import run_stage
    run = tmp_path / "run"
    cfg = compose(f"run_dir={run}", *TINY_RUN, "model.backbone.type=teacher", "model.parameterization=denoised")
    with pytest.raises(SystemExit) as e:
        run_stage("pipeline", cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config error: model.backbone.type=teacher copies the teacher's network into the "
                          "student, and GaussianMixture has none") and "\n" not in err, err
    assert not (run / "trajectories").exists()


def test_the_checks_cost_no_noticeable_time(tmp_path):
    rc = validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN))
    check_run(rc, "pipeline")                         # the imports (Lightning) are the training stage's anyway
    t0 = time.perf_counter()
    for _ in range(10):
        check_run(rc, "pipeline")
    assert (time.perf_counter() - t0) / 10 < 0.05


@no_gpu
def test_train_py_prints_one_line_and_writes_nothing(tmp_path):
    """The issue's cases, as a user types them: each used to make the whole data set first."""
    run = tmp_path / "run"
    env = {"TORCH_HOME": str(tmp_path / "torch-home")}
    cases = [(["trainer.devices=64"] if CORES < 64 else [f"trainer.devices={CORES + 1}"], "trainer.devices="),
             (["train.loss=lpips"], "train.loss='lpips': VGG-16 weights for the perceptual loss not found"),
             (["trainer.accelerator=cpu", "trainer.devices=-1"], "trainer.devices=-1: names GPUs"),
             (["experiment=cifar10_ddpm", f"teacher.path={tmp_path}"],
              "trainer.accelerator='gpu': this machine has no CUDA GPU; train on the CPU with "
              "trainer.accelerator=cpu (or auto), or trainer=default")]
    for overrides, message in cases:
        line = _one_line(_cli("train.py", f"run_dir={run}", *overrides, env=env))
        assert line.startswith(f"error: config error: {message}"), line
        assert not run.exists()


def test_wandb_online_without_an_api_key_is_refused_before_the_data_stage(tmp_path, capsys, monkeypatch):
    """W&B would ask for its key only when the data stage logs its artifact, minutes in."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    run = tmp_path / "run"
    for stage in ("data", "pipeline", "eval"):
        line = preflight_error(stage, run, "logger=wandb", "logger.mode=online", capsys=capsys)
        assert line == "config error: logger.mode='online': W&B has no API key for api.wandb.ai: run `wandb login` " \
                       "or set WANDB_API_KEY; or log offline (logger.mode=offline, `wandb sync` uploads later)"
    assert not run.exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    rc = validate(compose(f"run_dir={run}", *TINY_RUN, "logger=wandb", "logger.mode=online"))
    check_run(rc, "data")                 # `wandb login`'s entry is a key
    check_run(validate(compose(f"run_dir={run}", *TINY_RUN, "logger=wandb")), "data")   # offline needs none


def test_eval_and_data_gen_check_their_own_stages(tmp_path):
    """The stage reaches the Preflight of each entry point: neither eval.py nor python -m data_gen trains,
    so an unusable trainer does not stop them; their own stage's values do."""
    run = tmp_path / "run"
    (tmp_path / "a-file").write_text("")
    line = _one_line(_cli("-m", "data_gen", f"run_dir={run}", "trainer.devices=abc",
                          f"data.dir={tmp_path}/a-file/trajectories"))
    assert line == f"error: config error: data.dir='{tmp_path}/a-file/trajectories': cannot be made: " \
                   f"{tmp_path}/a-file is a file, not a folder"
    assert not run.exists()
    line = _one_line(_cli("eval.py", f"run_dir={run}", "trainer.devices=abc"))
    assert line.startswith(f"error: no sampler folder at {run}/sampler"), line


def test_gpu_settings_are_checked_against_the_machines_gpus(tmp_path, monkeypatch):
    """The GPU side of the check on a stand-in machine of one GPU without bfloat16 (checked before Lightning
    is asked, so nothing else of CUDA is needed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    cases = [(["trainer.accelerator=gpu", "trainer.devices=2"],
              "config error: trainer.devices=2: asks for 2 devices, but this machine has 1 GPU(s)"),
             (["trainer.devices=[1]"], "config error: trainer.devices=[1]: names device index 1, but this machine "
              "has 1 GPU(s)"),
             (["trainer=gpu"], "config error: trainer.precision='bf16-mixed': Tesla V100 has no bfloat16; use "
              "16-mixed or 32-true")]
    for overrides, message in cases:
        rc = validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN, *overrides))
        with pytest.raises(ConfigError) as e:
            check_run(rc, "pipeline")
        assert str(e.value) == message
