"""`experiment=mnist_gmm_psld` and `experiment=mnist_unet_psld` end to end on a tiny config:
trajectories of the exact PSLD mixture or of the PSLD score network, DSNO from the augmented noise to the
data part, its export, and eval beside the PSLD samplers; the config refuses what an augmented process
cannot run, in one line."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, compose
from hydra.errors import ConfigCompositionException

from dsno.config import ConfigError, validate

TINY = [o for o in TINY_RUN if not o.startswith(("experiment=", "eval.nfe", "solver.steps"))]


def _rc(tmp_path, *extra):
    return validate(compose("experiment=mnist_gmm_psld", f"run_dir={tmp_path / 'run'}", *TINY, "eval.nfe=[6,10]",
                            "solver.steps=12", *extra))


def test_psld_experiment_runs_end_to_end_and_scores_the_data_part(tmp_path):
    from dsno.builders import build_teacher, prior_state
    from dsno.sampler import load_sampler
    from dsno.solvers.reference import reference_solve
    from dsno.stages.pipeline import run
    rc = _rc(tmp_path)
    run(rc, config={})
    teacher = build_teacher(rc.teacher)
    sampler = load_sampler(tmp_path / "run" / "sampler")
    assert sampler.state_shape == (2, 16, 16) and sampler.data_channels == 1
    # the operator maps (x_T, m_T) to the data part of the trajectory: its backbone emits 1 channel of 2
    assert sampler.output_channels == 1 and sampler.config["backbone"]["kwargs"]["out_channels"] == 1
    assert tuple(sampler(torch.zeros(2, 2, 16, 16)).shape) == (2, len(rc.data.times), 1, 16, 16)
    images = sampler.sample(4, seed=3)
    assert images.shape == (4, 1, 16, 16) and bool(torch.isfinite(images).all())

    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["reference"]["solver"].startswith("DOP853")
    rows = {(r["method"], r["nfe"]): r for r in metrics["rows"]}
    run_rows = [r for r in metrics["rows"] if "skipped" not in r and r["method"] not in ("dsno",)
                and not r["method"].startswith("teacher")]
    assert len({r["method"] for r in run_rows}) >= 5
    assert all(r["rmse_vs_reference"] == r["rmse_vs_reference"] for r in run_rows)    # no NaN
    # the teacher row is NVV on the 12-step data grid: far closer to the DOP853 reference than one Euler step
    teacher_row = next(r for r in metrics["rows"] if r["method"].startswith("teacher"))
    assert teacher_row["rmse_vs_reference"] < rows[("augmented_euler", 10)]["rmse_vs_reference"]
    assert "cannot spend exactly 10" in rows[("nvv", 10)]["skipped"]                     # 3 NFE per step

    # the eval reference is the DOP853 solve of the prior-scaled noise, data channels only
    x_T = torch.randn(rc.eval.num_samples, *sampler.state_shape, generator=torch.Generator().manual_seed(rc.eval.seed))
    ref = reference_solve(teacher, prior_state(teacher, x_T.double()), rc.solver.t_end)[:, :1]
    dsno_rmse = float((sampler(x_T)[:, -1, :1].double() - ref).square().mean().sqrt())
    assert dsno_rmse == pytest.approx(rows[("dsno", 1)]["rmse_vs_reference"], rel=1e-4)


@pytest.mark.parametrize("override,message", [
    ("solver=dpm_solver_pp", "solver.name='dpm_solver_pp': integrates another kind of process than teacher kind "
                             "psld_mnist_gmm (augmented)"),
    ("eval.solvers=[{name:ddim}]", "eval.solvers[0].name='ddim': integrates another kind of process"),
    ("solver.spacing=logsnr", "solver.spacing='logsnr': teacher kind psld_mnist_gmm is an augmented process"),
    ("model.parameterization=denoised", "model.parameterization='denoised': teacher kind psld_mnist_gmm has no "
                                        "scalar schedule"),
    ("teacher.nu=-1", "teacher.nu=-1.0: PSLD needs nu > 0"),
])
def test_what_an_augmented_process_cannot_run_is_one_line(tmp_path, override, message):
    with pytest.raises((ConfigError, ConfigCompositionException)) as e:
        _rc(tmp_path, override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_neural_psld_experiment_distils_the_score_network(tmp_path):
    """The shipped PSLD score network: its NVV trajectories make the data set, the student maps (x_T, m_T)
    to their data part, and eval scores it and the samplers against the network's own DOP853 solve."""
    from dsno.builders import build_teacher
    from dsno.sampler import load_sampler
    from dsno.stages.pipeline import run
    from dsno.teachers.psld_unet import PSLDUNetTeacher
    rc = validate(compose("experiment=mnist_unet_psld", f"run_dir={tmp_path / 'run'}", *TINY, "eval.nfe=[6,12]",
                          "solver.steps=8", "eval.num_samples=4", "eval.reference_rtol=1e-4"))
    run(rc, config={})
    assert isinstance(build_teacher(rc.teacher), PSLDUNetTeacher)
    manifest = json.loads((Path(rc.data.dir) / "manifest.json").read_text())
    assert manifest["fingerprint"]["teacher"]["class"] == "PSLDUNetTeacher"
    assert manifest["fingerprint"]["state_shape"] == [2, 16, 16]
    sampler = load_sampler(tmp_path / "run" / "sampler")
    assert sampler.output_channels == 1 and sampler.state_shape == (2, 16, 16)
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["reference"]["solver"].startswith("DOP853")
    rows = {(r["method"], r["nfe"]): r for r in metrics["rows"] if "skipped" not in r}
    assert {m for m, _ in rows} >= {"dsno", "lambda_ddim", "csps_d", "nvv", "rvv", "augmented_euler", "sscs"}
    assert all(math.isfinite(r["rmse_vs_reference"]) for r in rows.values())
    # NVV on its 8-step data grid (24 NFE) is closer to the reference than 6 Euler steps
    teacher_row = next(r for r in metrics["rows"] if r["method"].startswith("teacher"))
    assert teacher_row["nfe"] == 24
    assert teacher_row["rmse_vs_reference"] < rows[("augmented_euler", 6)]["rmse_vs_reference"]
