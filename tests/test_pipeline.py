"""The whole pipeline through its real entry points, on a tiny configuration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_train_py_runs_every_stage_and_eval_py_rereads(tmp_path):
    run_dir = tmp_path / "run"
    _run("train.py", f"run_dir={run_dir}", *TINY_RUN, "export.forms=[safetensors,pt2]")
    for f in ("trajectories/manifest.json", "checkpoints/last.ckpt", "checkpoints/dsno_ema.safetensors",
              "sampler/config.json", "sampler/weights.safetensors", "sampler/sampler.pt2",
              "eval/metrics.json", "eval/report.md", "eval/comparison.png", "eval/grids/grid_dsno_nfe1.png",
              "eval/plot_rmse_vs_nfe.png"):
        assert (run_dir / f).is_file(), f
    assert "![comparison](comparison.png)" in (run_dir / "eval" / "report.md").read_text()
    assert not list((run_dir / "eval").glob("grid_*.png"))      # the per-run grids sit in eval/grids/
    rows = json.loads((run_dir / "eval" / "metrics.json").read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"dsno", "ddim-1", "deis-3", "dpm_solver_pp-3"} <= methods
    for r in rows:
        if "skipped" not in r:
            assert r["rmse_vs_reference"] >= 0 and r["sec_per_sample"] > 0
    ddim = {r["nfe"]: r["rmse_vs_reference"] for r in rows if r["method"] == "ddim-1"}
    assert ddim[3] < ddim[1]                          # more steps, closer to the reference
    # eval.py alone reads the exported sampler back and gives the same DSNO error
    (run_dir / "eval" / "metrics.json").unlink()
    _run("eval.py", f"run_dir={run_dir}", *TINY_RUN)
    again = json.loads((run_dir / "eval" / "metrics.json").read_text())["rows"]
    dsno_err = [r["rmse_vs_reference"] for r in rows if r["method"] == "dsno"]
    assert [r["rmse_vs_reference"] for r in again if r["method"] == "dsno"] == pytest.approx(dsno_err, rel=1e-6)


def test_training_on_trajectories_of_another_solver_grid_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    _run("-m", "data_gen", f"run_dir={run_dir}", *TINY_RUN)
    p = _run("train.py", f"run_dir={run_dir}", *TINY_RUN, "solver.steps=16", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "grid" in p.stderr and "steps" in p.stderr          # the differing keys, both sides shown
    assert "Traceback" not in p.stderr
    # another teacher (its schedule differs): refused too, naming the teacher's differing field
    p = _run("train.py", f"run_dir={run_dir}", *TINY_RUN, "teacher.schedule.beta_max=19.0", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "teacher" in p.stderr and "19.0" in p.stderr and "20.0" in p.stderr


def test_bad_override_fails_before_any_work(tmp_path):
    p = _run("train.py", f"run_dir={tmp_path / 'r'}", "model.modes=7", check=False)
    assert p.returncode == 2
    assert "model.modes=7: must be <= M // 2 + 1 = 2 for M = 2" in p.stderr   # the default's M = 2 output times
    assert not (tmp_path / "r" / "trajectories").exists()


def test_training_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    import signal
    import time

    import torch
    from safetensors.torch import load_file
    args = [*TINY_RUN, "trainer.max_steps=8", f"data.dir={tmp_path / 'data'}"]
    _run("train.py", f"run_dir={tmp_path / 'full'}", *args, "eval.num_samples=4")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "train.py", f"run_dir={tmp_path / 'killed'}", *args,
                             "eval.num_samples=4"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step, deadline = 0, time.time() + 300
    while step < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if last.is_file():
            try:
                step = torch.load(last, weights_only=True)["global_step"]
            except Exception:   # noqa: BLE001 - the atomic rename can race the read; poll again
                pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= step < 8, f"killed at step {step}"
    assert not (tmp_path / "killed" / "checkpoints" / "dsno_ema.safetensors").exists()
    _run("train.py", f"run_dir={tmp_path / 'killed'}", *args, "eval.num_samples=4")
    a = load_file(str(tmp_path / "full" / "checkpoints" / "dsno_ema.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "dsno_ema.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
