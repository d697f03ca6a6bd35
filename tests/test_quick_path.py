"""The quick path for a user's own model: `python train.py experiment=diffusers_quick teacher.path=DIR` on a
diffusers folder (a tiny random UNet2DModel here, sizes cut further), end to end through the real entry point:
every stage, a report that opens with its verdict, says FID was not computed and what distillation cost,
timing as medians with spread, progress lines for the reference and every row."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_teachers_neural import write_folder

ROOT = Path(__file__).resolve().parent.parent
TINIER = ["data.num_trajectories=16", "data.shard_size=16", "data.batch_size=16", "solver.steps=4",
          "trainer.max_steps=2", "trainer.val_check_interval=2", "train.batch_size=4", "train.warmup_steps=1",
          "eval.num_samples=8", "eval.batch_size=8", "eval.nfe=[2]", "eval.timing_repeats=2", "eval.grid_samples=4",
          "logger=csv"]


def test_diffusers_quick_runs_a_diffusers_folder_end_to_end(tmp_path):
    write_folder(tmp_path / "teacher", num_train_timesteps=1000)
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "train.py", "experiment=diffusers_quick", f"teacher.path={tmp_path / 'teacher'}",
                        f"run_dir={run_dir}", *TINIER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert result["fidelity"] == {"computed": False, "why": "eval.fidelity=false"}
    assert result["reference"] == {"solver": "dpm_solver_pp-3", "steps": 50, "dtype": "float64"}   # max(50, 5 x 2): a network
    rows = [r for r in result["rows"] if "skipped" not in r]
    assert {r["method"] for r in rows} == {"dsno", "teacher (dpm_solver_pp-3)", "ddim-1", "dpm_solver_pp-3", "unipc-3"}
    for r in rows:
        assert r["timing_repeats"] == 2 and 0 < r["sec_per_sample_min"] <= r["sec_per_sample"] <= r["sec_per_sample_max"]
        assert 0 < r["cost_teacher_evals_min"] <= r["cost_teacher_evals"] <= r["cost_teacher_evals_max"]
    assert result["teacher_eval"]["timing_repeats"] == 2 and result["teacher_eval"]["sec_per_sample"] > 0
    cost = result["distillation"]
    assert cost["num_trajectories"] == 16 and cost["data_seconds"] >= 0
    assert cost["train_steps"] == 2 and cost["train_seconds"] > 0
    md = (run_dir / "eval" / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## What distillation cost") < md.index("## Samples")
    assert "- **RMSE at equal cost**: " in md and "FID was not computed (eval.fidelity=false)." in md
    assert "FID against" not in md and "digits" not in md
    log = p.stderr + p.stdout
    assert "eval: float64 reference (solver dpm_solver_pp-3, steps 50, dtype float64) on 8 samples, about" in log
    assert "eval: reference 50/50 teacher evaluations" in log                    # 8 samples in one batch
    assert "eval: [1/5] dsno" in log and "eval: [5/5] unipc-3" in log                # dsno, teacher, 3 solvers


def test_output_times_outside_a_short_discrete_teacher_are_one_line(tmp_path):
    """A diffusers scheduler of 40 training steps starts at t = 1/40: the default data.times end 0.001 is
    outside it (its log-SNR was NaN, and the grid's step count a raw ValueError traceback)."""
    write_folder(tmp_path / "teacher", num_train_timesteps=40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    p = subprocess.run([sys.executable, "train.py", "experiment=diffusers_quick", f"teacher.path={tmp_path / 'teacher'}",
                        f"run_dir={tmp_path / 'run'}", *TINIER], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == ("error: config error: data.times=[0.25, 0.001]: the output times must "
                                                 "lie in this teacher's time range [0.025, 1]; pick data.times inside it")
    assert not (tmp_path / "run" / "trajectories").exists()
