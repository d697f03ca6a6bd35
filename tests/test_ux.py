"""What a user sees: a diffusers folder given to another teacher kind, a wrapped network's time
convention, a help line for every key, a rerun of a complete run, Ctrl-C, Lightning's log lines."""

import pytest


@pytest.mark.parametrize("marker", ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("kind", ["unet", "psld_unet", "mnist_gmm", "mnist_gmm_cond", "gmm_file"])
def test_a_diffusers_folder_under_another_kind_names_teacher_diffusers(tmp_path, kind, marker):
    from dsno.builders import build_teacher
    from dsno.config import teacher_config
    from dsno.teachers.base import TeacherLoadError
    folder = tmp_path / "ddpm"
    (folder / marker).parent.mkdir(parents=True, exist_ok=True)
    (folder / marker).write_text("{}")
    with pytest.raises(TeacherLoadError) as e:
        build_teacher(teacher_config({"kind": kind, "path": str(folder)}))
    msg = str(e.value)
    assert "\n" not in msg and "add teacher=diffusers" in msg and f"teacher.kind={kind}" in msg
    assert "not found" not in msg


def test_a_plain_missing_folder_keeps_its_kinds_message(tmp_path):
    from dsno.builders import build_teacher
    from dsno.config import teacher_config
    from dsno.teachers.base import TeacherLoadError
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="not found; make them with"):
        build_teacher(teacher_config({"kind": "unet", "path": str(tmp_path / "empty")}))


def _mtimes(run_dir, *rels):
    return {rel: (run_dir / rel).stat().st_mtime_ns for rel in rels}


def test_a_complete_run_is_not_redone_unless_asked(tiny_run, tmp_path, caplog):
    import logging
    from dsno.stages.pipeline import run
    run_dir = tmp_path / "run"
    outputs = ("checkpoints/dsno_ema.safetensors", "sampler/weights.safetensors", "eval/report.md")
    run(tiny_run(run_dir=run_dir))
    first = _mtimes(run_dir, *outputs)
    with caplog.at_level(logging.INFO, logger="dsno"):
        caplog.clear()
        run(tiny_run(run_dir=run_dir))
    assert _mtimes(run_dir, *outputs) == first
    said = [r.getMessage() for r in caplog.records if "already complete" in r.getMessage()]
    assert len(said) == 1 and "nothing redone" in said[0] and str(run_dir / "eval" / "report.md") in said[0]
    assert "force=true" in said[0]
    # an eval key changed: eval only is run again
    run(tiny_run("eval.nfe=[1,2]", run_dir=run_dir))
    now = _mtimes(run_dir, *outputs)
    assert now["eval/report.md"] != first["eval/report.md"]
    assert now["sampler/weights.safetensors"] == first["sampler/weights.safetensors"]
    assert now["checkpoints/dsno_ema.safetensors"] == first["checkpoints/dsno_ema.safetensors"]
    # asked to: export and eval run again
    run(tiny_run("eval.nfe=[1,2]", "force=true", run_dir=run_dir))
    forced = _mtimes(run_dir, *outputs)
    assert forced["sampler/weights.safetensors"] != now["sampler/weights.safetensors"]
    assert forced["eval/report.md"] != now["eval/report.md"]
    # a missing output makes its stage run again
    (run_dir / "eval" / "report.md").unlink()
    run(tiny_run("eval.nfe=[1,2]", run_dir=run_dir))
    assert (run_dir / "eval" / "report.md").is_file()
    assert _mtimes(run_dir, "sampler/weights.safetensors") == {"sampler/weights.safetensors":
                                                                forced["sampler/weights.safetensors"]}


def _interrupt(args, when, tmp_path):
    """Run `python args...`, send SIGINT once a stdout line contains `when`; (status, stderr lines)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, seen = time.time() + 300, []
    while time.time() < deadline:
        seen.append(proc.stdout.readline())
        if when in seen[-1] or not seen[-1]:
            break
    assert when in seen[-1], seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    return proc.returncode, [line for line in err.splitlines() if line.strip()]


def test_ctrl_c_in_the_data_stage_is_one_line_and_status_130(tmp_path):
    # the UNet teacher: a solve of 512 trajectories takes far longer than the wait for its first line
    status, err = _interrupt(["-m", "data_gen", "experiment=mnist_unet_quick", f"run_dir={tmp_path / 'run'}",
                              "data.num_trajectories=512", "data.shard_size=64", "data.batch_size=64"],
                             "checked the bytes", tmp_path)
    assert status == 130
    assert err[-1] == "interrupted: the trajectory shards written so far are kept; the same command resumes from them"


def test_ctrl_c_in_training_is_the_same_one_line_not_lightnings_exit_1(tmp_path):
    from conftest import TINY_RUN
    status, err = _interrupt(["train.py", f"run_dir={tmp_path / 'run'}", *TINY_RUN, "trainer.max_steps=1000",
                              "trainer.val_check_interval=1000"], "train: step 50/", tmp_path)
    assert status == 130
    assert err[-1].startswith("interrupted: the work so far is kept (trajectory shards, checkpoints/last.ckpt")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_a_run_log_has_each_lightning_line_once_and_ends_naming_the_report(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TINY_RUN
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "run"

    def train(*extra):
        p = subprocess.run([sys.executable, "train.py", f"run_dir={run_dir}", *TINY_RUN, *extra], cwd=root, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:]
        return [line for line in p.stdout.splitlines() if line.strip()]

    lines = train("logger=wandb", "logger.mode=offline")
    fit_done = [line for line in lines if "`Trainer.fit` stopped" in line]
    assert len(fit_done) == 1, lines                 # Lightning's own handler printed each line a second time
    assert not [line for line in lines if any(w in line for w in ("Tip:", "anonymous setting", "LeafSpec"))], lines
    assert lines[-1].endswith(f"done: the report is {run_dir / 'eval' / 'report.md'}"), lines[-3:]
    again = train("logger=wandb", "logger.mode=offline")
    assert any("already complete for this config: nothing redone" in line for line in again), again
    assert not [line for line in again if "Trainer" in line or "eval:" in line], again


def _ddpm_like_unet():
    """A diffusers UNet2DModel (random weights): it embeds the timestep as DDPM step indices 0-999."""
    import torch
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()


def test_a_network_of_ddpm_steps_wrapped_without_its_time_convention_is_refused():
    import torch
    from dsno import VPSchedule
    from dsno.teachers import wrap
    from dsno.teachers.base import TimeInputError
    unet = _ddpm_like_unet()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for schedule, fix in ((VPSchedule.ddpm_linear(1000), "pass time_input='discrete'"),
                          (VPSchedule.linear(), "wrap it with its discrete schedule")):
        teacher = wrap(lambda x, t: unet(x, t).sample, schedule=schedule, prediction="eps")
        with pytest.raises(TimeInputError) as e:
            teacher.eps(x, 0.5)
        msg = str(e.value)
        assert "\n" not in msg and "hardly responds to schedule time t in [0, 1]" in msg and fix in msg, msg


def test_the_stated_discrete_convention_feeds_step_indices_and_passes_the_probe():
    import warnings

    import torch
    from dsno import VPSchedule
    from dsno.teachers import wrap
    unet = _ddpm_like_unet()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    teacher = wrap(lambda x, t: unet(x, t).sample, schedule=VPSchedule.ddpm_linear(1000), prediction="eps",
                   time_input="discrete")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = teacher.eps(x, 0.5)
    with torch.no_grad():
        assert torch.equal(out, unet(x, torch.full((3,), 499.0)).sample)


def test_a_stated_wrong_convention_is_warned_in_one_line():
    import torch
    from dsno import VPSchedule
    from dsno.teachers import wrap
    unet = _ddpm_like_unet()
    teacher = wrap(lambda x, t: unet(x, t).sample, schedule=VPSchedule.ddpm_linear(1000), time_input="continuous")
    with pytest.warns(UserWarning, match=r"time_input='continuous' looks wrong: .*pass time_input='discrete'$"):
        teacher.eps(torch.randn(2, 1, 8, 8), 0.5)


def test_a_network_of_schedule_time_wrapped_unstated_is_accepted():
    import warnings

    import torch
    from dsno.teachers.unet import load_unet_teacher
    from dsno.teachers import wrap
    own = load_unet_teacher()           # the project's UNet: continuous time in [0, 1]
    teacher = wrap(own.network, schedule=own.schedule, prediction="eps")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(teacher.eps(x, 0.3), own.eps(x, 0.3))


def _leaf_keys(node, prefix=""):
    from omegaconf import DictConfig
    for k in node:
        v = node._get_node(k)
        if isinstance(v, DictConfig) and len(v) and not k == "options":
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


@pytest.mark.parametrize("schema", ["run", "search"])
@pytest.mark.parametrize("kind", ["mnist_gmm", "mnist_gmm_cond", "gmm_file", "unet", "diffusers", "psld_mnist_gmm",
                                  "psld_unet"])
def test_every_key_of_the_composed_config_has_a_help_line(kind, schema):
    from conftest import compose
    from dsno.config import key_help
    cfg = compose(f"teacher={kind}", f"schema={schema}", default_experiment=None)
    helps = key_help(cfg)
    keys = [k for k in _leaf_keys(cfg) if k != "hydra" and not k.startswith("hydra.")]
    assert keys and set(keys) == set(helps), set(keys) ^ set(helps)
    undocumented = [k for k in keys if not helps[k].strip() or "\n" in helps[k]]
    assert not undocumented
    assert ("nfe" in helps) == (schema == "search")


def test_train_py_help_prints_every_key_with_its_value_and_help():
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "train.py", "experiment=mnist_gmm", "trainer.max_steps=7", "--help"], cwd=root,
                       env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("  ") and "=" in line.split()[0]}
    assert "optimizer steps of the training run" in rows["trainer.max_steps=7"]
    assert "trajectories per optimizer step" in rows["train.batch_size=32"]
    assert "teacher.components=64" in rows and "force=false" in rows


def test_loading_a_diffusers_folder_prints_no_accelerate_advice(tmp_path, capfd):
    from dsno.teachers.diffusers import load_diffusers_teacher
    from test_teachers_neural import write_folder
    write_folder(tmp_path)
    capfd.readouterr()
    load_diffusers_teacher(tmp_path)
    out, err = capfd.readouterr()
    assert "accelerate" not in out + err


def test_the_completion_stamp_covers_what_a_stage_makes_and_not_how_it_reads(tiny_run, tmp_path):
    from dsno.stages.completion import stamp
    base = tiny_run(run_dir=tmp_path / "a")
    assert stamp(tiny_run(run_dir=tmp_path / "b"), "eval") == stamp(base, "eval")      # another run_dir, same run
    for override, changed in (("train.lr=0.002", "train"), ("export.forms=[safetensors,onnx]", "export"),
                              ("eval.num_samples=16", "eval")):
        other = tiny_run(override, run_dir=tmp_path / "a")
        for stage in ("train", "export", "eval"):
            later = ("train", "export", "eval").index(stage) >= ("train", "export", "eval").index(changed)
            assert (stamp(other, stage) != stamp(base, stage)) == later, (override, stage)
    for override in ("train.resume=false", "data.verify=full", "data.num_workers=1"):
        assert stamp(tiny_run(override, run_dir=tmp_path / "a"), "eval") == stamp(base, "eval"), override
