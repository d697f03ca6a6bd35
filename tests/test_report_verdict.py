"""The report's headline verdict on a synthetic metrics dict: where DSNO wins and where it loses, at
equal (median) cost, in RMSE and FID; the report names FID's reference or says it was not computed."""

import json

import torch

from dsno.stages.report import teacher_lines, teacher_ratio, verdict_lines, write_report


def row(method, nfe, rmse, fid, ms, cost=None, spread=0.1, **extra):
    """A metrics row; cost: its measured cost in teacher evaluations (None: not measured), +- spread."""
    r = {"method": method, "nfe": nfe, "rmse_vs_reference": rmse, "fid": fid, "sec_per_sample": ms * 1e-3,
         "sec_per_sample_min": (ms - 0.1) * 1e-3, "sec_per_sample_max": (ms + 0.1) * 1e-3, "timing_repeats": 5, **extra}
    if cost is not None:
        r.update(cost_teacher_evals=cost, cost_teacher_evals_min=cost - spread, cost_teacher_evals_max=cost + spread)
    return r


def rows():
    return [row("dsno", 1, 0.10, 20.0, 3.0, 2.5),
            row("teacher (dpm_solver_pp-3)", 20, 0.01, 5.0, 25.0, 20.0),
            row("ddim-1", 1, 0.50, 80.0, 1.0, 1.0),
            row("dpm_solver_pp-3", 2, 0.30, 40.0, 2.5, 2.0),
            row("dpm_solver_pp-3", 6, 0.05, 12.0, 7.0, 6.0),
            row("ddpm", 3, 0.01, 15.0, 4.0, 3.0, stochastic=True),
            {"method": "deis-3", "nfe": 1, "skipped": "needs 2 NFE"}]


def test_verdict_says_where_dsno_wins_and_where_it_loses():
    assert verdict_lines(rows()) == [
        "- **RMSE at equal cost**: DSNO wins: 0.1000 at 2.5 teacher evaluations (3.000 ms/sample median), against "
        "0.3000 of the best solver run no costlier, dpm_solver_pp-3 at 2 NFE (2 teacher evaluations).",
        # the stochastic ddpm's 0.01 follows other noise: not an RMSE competitor; the teacher solve is no baseline
        "- **Where DSNO loses in RMSE**: to 1 of 3 solver runs; the cheapest dpm_solver_pp-3 at 6 NFE: RMSE 0.0500 "
        "against DSNO's 0.1000, at 2.4x DSNO's cost.",
        "- **FID at equal cost**: DSNO wins: 20.00 at 2.5 teacher evaluations (3.000 ms/sample median), against "
        "40.00 of the best solver run no costlier, dpm_solver_pp-3 at 2 NFE (2 teacher evaluations).",
        "- **Where DSNO loses in FID**: to 2 of 4 solver runs; the cheapest ddpm at 3 NFE: FID 15.00 against "
        "DSNO's 20.00, at 1.2x DSNO's cost; the best dpm_solver_pp-3 at 6 NFE: 12.00, at 2.4x."]


def test_verdict_when_dsno_loses_at_equal_cost_within_timing_noise_and_when_nothing_beats_it():
    rs = [row("dsno", 1, 0.10, 20.0, 3.0, 3.0, spread=0.5), row("unipc-3", 3, 0.08, 30.0, 2.9, 2.9, spread=0.5),
          row("ddim-1", 5, 0.20, 50.0, 6.0, 6.0)]
    lines = verdict_lines(rs)
    assert lines[0].startswith("- **RMSE at equal cost**: DSNO loses: 0.1000 at 3 teacher evaluations (3.000 ms/sample "
                               "median), against 0.0800 of the best solver run no costlier, unipc-3 at 3 NFE")
    assert lines[0].endswith("(their cost spreads overlap: equal within the timing's noise).")
    assert lines[1].startswith("- **Where DSNO loses in RMSE**: to 1 of 2 solver runs; the cheapest unipc-3 at 3 NFE")
    assert lines[2].startswith("- **FID at equal cost**: DSNO wins")
    assert lines[3] == "- **FID**: no solver run evaluated (up to 5 NFE) beats DSNO."


def test_verdict_falls_back_to_wall_clock_when_no_cost_was_measured_and_without_fid():
    rs = [row("dsno", 1, 0.10, None, 1.0), row("ddim-1", 1, 0.30, None, 2.0)]
    assert verdict_lines(rs) == [
        "- **RMSE at equal cost**: no solver run is as cheap as DSNO (1.000 ms/sample median); the cheapest, ddim-1 "
        "at 1 NFE, costs 2x DSNO's with RMSE 0.3000 against DSNO's 0.1000.",
        "- **RMSE**: no solver run evaluated (up to 1 NFE) beats DSNO."]
    assert verdict_lines([row("ddim-1", 1, 0.3, None, 2.0)]) == []


def test_dsno_fid_against_its_teacher_solve_on_held_out_noise():
    ratio = teacher_ratio(rows())
    assert ratio["fid_ratio"] == 4.0 and not ratio["met"] and ratio["teacher"] == "teacher (dpm_solver_pp-3)"
    assert teacher_lines(rows()) == [
        "- **Teacher gap**: DSNO's FID 20.00 is 4.00x the teacher solve's 5.00 (teacher (dpm_solver_pp-3) at "
        "20 NFE) on the same eval noise, which no training trajectory used: the 1.2x target is missed."]
    near = [row("dsno", 1, 0.1, 5.5, 3.0), row("teacher (ddim-1)", 20, 0.0, 5.0, 20.0)]
    assert teacher_ratio(near)["met"] and teacher_lines(near)[0].endswith("the 1.2x target is met.")
    assert teacher_ratio([row("dsno", 1, 0.1, None, 3.0), row("teacher (ddim-1)", 20, 0.0, 5.0, 20.0)]) is None
    assert teacher_lines([row("dsno", 1, 0.1, 5.5, 3.0)]) == []


def _write(tmp_path, fidelity):
    g = torch.Generator().manual_seed(0)
    rs = rows()
    finals = {"reference": torch.rand(10, 1, 8, 8, generator=g) * 2 - 1}
    for r in rs:
        if "skipped" not in r:
            finals[f"{r['method']}@{r['nfe']}"] = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1
            r.update(kid=0.0123, kid_std=0.0004)
    result = {"experiment": "t", "num_samples": 10, "device": "cpu", "rows": rs, "fidelity": fidelity,
              "reference": {"solver": "dpm_solver_pp-3", "steps": 50, "dtype": "float64"},
              "teacher_eval": {"sec_per_sample": 1.2e-3, "sec_per_sample_min": 1.1e-3, "sec_per_sample_max": 1.5e-3,
                               "timing_repeats": 5, "t": 0.5},
              "distillation": {"data_seconds": 12.0, "num_trajectories": 128, "train_seconds": 300.0,
                               "train_steps": 100}}
    write_report(result, finals, tmp_path, grid_samples=4)
    return (tmp_path / "report.md").read_text()


def test_report_opens_with_the_verdict_names_the_fid_reference_and_the_cost(tmp_path):
    md = _write(tmp_path, {"computed": True, "reference": "the real images of eval.fidelity_reference=/d/real.npz",
                           "path": "/d/real.npz", "features": "Inception-v3 (torch-fidelity's inception-v3-compat)"})
    head = md.split("## Samples")[0]
    assert "## Verdict" in head and "Where DSNO loses in FID**: to 2 of 4 solver runs" in head
    assert "- **Teacher gap**: DSNO's FID 20.00 is 4.00x the teacher solve's 5.00" in head
    assert ("FID against the real images of eval.fidelity_reference=/d/real.npz, on Inception-v3 (torch-fidelity's "
            "inception-v3-compat) features.") in head
    assert "real digits" not in md
    assert ("every method was timed 5 times (median, with min-max in the tables), each time with one teacher "
            "evaluation right after it") in head and "one teacher evaluation took 1.200 (1.100-1.500) ms" in head
    assert "- data generation 12 s (128 teacher trajectories" in head and "- training 5.0 min (100 steps)" in head
    assert "| KID |" in md and "| 0.0123 +- 0.0004 |" in md and "in the squared units of those features" in md
    assert "| 3.000 (2.900-3.100) | 2.5 |" in md                          # median (spread), cost in teacher evals
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["rows"][0]["sec_per_sample_min"] == 2.9e-3 and saved["rows"][0]["timing_repeats"] == 5


def test_report_says_when_fid_was_not_computed(tmp_path):
    md = _write(tmp_path, {"computed": False, "why": "eval.fidelity=false"})
    assert md.count("FID was not computed (eval.fidelity=false).") == 2
    assert "FID against" not in md


def test_plots_place_dsno_at_its_measured_cost():
    from dsno.stages.report import plot_x
    dsno, ddim = rows()[0], rows()[2]
    assert plot_x(dsno, "nfe") == 2.5 and plot_x(ddim, "nfe") == 1 and plot_x(dsno, "sec_per_sample") == 3e-3
