"""A user's mistake is one line naming the key or file, exit status 2, and nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_RUN, compose
from dsno.config import ConfigError, check_trainer_hardware, validate

ROOT = Path(__file__).resolve().parent.parent

HARDWARE = [
    (["trainer.accelerator=gpu"], "trainer.accelerator='gpu': this machine has no CUDA GPU; train on the CPU with "
     "trainer.accelerator=cpu (or auto), or trainer=default for the whole CPU trainer"),
    ([f"trainer.devices={(os.cpu_count() or 1) + 6}"],
     f"trainer.devices={(os.cpu_count() or 1) + 6}: asks for {(os.cpu_count() or 1) + 6} devices, but this "
     f"machine has {os.cpu_count() or 1} CPU core(s)"),
    (["trainer.devices=[0,99]"], "trainer.devices=[0, 99]: names GPUs, but this run trains on the CPU"),
    (["trainer.devices=banana"], "trainer.devices='banana': must be auto, -1, a positive integer"),
    (["trainer.devices=2", "data.num_trajectories=40", "train.batch_size=32"],
     "trainer.devices=2: 2 ranks need at least 2 training batches, but data.num_trajectories=40 gives 1 of "
     "train.batch_size=32"),
]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the world-size case needs 2 CPU devices to be allowed")
@pytest.mark.parametrize("overrides,message", HARDWARE, ids=[" ".join(h[0]) for h in HARDWARE])
def test_trainer_hardware_is_checked_before_training(overrides, message):
    import torch
    assert not torch.cuda.is_available(), "these cases describe a machine without a GPU"
    rc = validate(compose(*overrides))
    with pytest.raises(ConfigError) as e:
        check_trainer_hardware(rc)
    assert str(e.value).startswith(f"config error: {message}"), str(e.value)


def _cli(*args, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


def _one_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def test_entry_points_print_one_line_and_write_nothing(tmp_path):
    run = tmp_path / "run"
    line = _one_line(_cli("-m", "data_gen", f"run_dir={run}", "data.times=[0.5,nan,0.001]"))
    assert line == "error: config error: data.times=[0.5, nan, 0.001]: must be finite numbers"
    assert not run.exists()
    line = _one_line(_cli("train.py", f"run_dir={run}", "trainer.devicez=2"))
    assert line == "error: Could not override 'trainer.devicez': Key 'devicez' not in 'TrainerConfig'"
    line = _one_line(_cli("train.py", "run_dir=/proc/dsno-cannot-write-here"))
    assert line.startswith("error: run_dir=/proc/dsno-cannot-write-here is not writable")
    line = _one_line(_cli("eval.py", f"run_dir={run}"))
    assert line.startswith(f"error: no sampler folder at {run}/sampler")
    assert sorted(p.name for p in run.iterdir()) == ["hydra"]          # Hydra's own record of the run
    debug = _cli("eval.py", f"run_dir={run}", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_teacher_files_of_the_wrong_kind_are_named(tmp_path, capsys):
    from dsno.cli import run_stage
    unet = ROOT / "dsno" / "assets" / "mnist_gmm16_k64.safetensors"
    bad_json = tmp_path / "ddpm"
    (bad_json / "unet").mkdir(parents=True)
    (bad_json / "unet" / "config.json").write_text("{not json")
    (bad_json / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (bad_json / "scheduler").mkdir()
    (bad_json / "scheduler" / "scheduler_config.json").write_text("{}")
    cases = [
        (["teacher=unet", f"teacher.path={unet}"],
         f"error: cannot load the teacher (teacher.kind=unet) from {unet}: {unet} has no 'dsno_teacher' metadata"),
        (["teacher=diffusers", f"teacher.path={bad_json}"],
         f"error: cannot load the teacher (teacher.kind=diffusers) from {bad_json}: {bad_json}/unet/config.json "
         "is not valid JSON"),
        (["teacher=unet", "teacher.prediction=v"],     # the weights decide; a different value is refused
         "error: teacher.prediction=v, but the teacher (teacher.kind=unet) predicts eps: set teacher.prediction=eps"),
        (["teacher=mnist_gmm", f"teacher.path={unet}", "teacher.components=32"],   # the file's K decides
         f"error: cannot load the teacher (teacher.kind=mnist_gmm) from {unet}: {unet} holds 64 components of "
         "1x16x16 images, but the config asks for teacher.components=32"),
    ]
    for overrides, message in cases:
        cfg = compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN, *overrides)
        with pytest.raises(SystemExit) as e:
            run_stage("data", cfg)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_corrupt_last_ckpt_is_one_line(tmp_path, capsys):
    from dsno.cli import run_stage
    run = tmp_path / "run"
    cfg = compose(f"run_dir={run}", *TINY_RUN)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(SystemExit) as e:
        run_stage("pipeline", cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: refusing to load checkpoint {run}/checkpoints/last.ckpt: it is corrupt"), err
    assert not (run / "sampler").exists()
