"""A guided class-conditional teacher distilled end to end: train on labelled trajectories, export, and
eval with every method on the same noise AND labels (DSNO through its sampler, each solver and the
float64 reference on the bound, guided teacher), scored for label accuracy by the digit classifier;
the comparison figure has one row per label; an unconditional run's record is unchanged."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_RUN, compose
from dsno.builders import build_teacher, prior_state
from dsno.config import validate
from dsno.data import FingerprintMismatchError, trajectory_labels
from dsno.metrics.fidelity import label_accuracy
from dsno.solvers.reference import reference_solve
from dsno.stages import evaluation, pipeline
from dsno.stages.report import FIGURE_FILE, label_figure
from dsno.teachers.conditional import ConditionedTeacher, bind

GUIDANCE = 1.0
N = 8


def _config(root, *extra):
    return validate(compose(f"run_dir={root / 'run'}", *TINY_RUN, "teacher=mnist_gmm_cond", "teacher.size=8",
                            "teacher.per_class=2", f"teacher.path={root / 'fit.safetensors'}",
                            f"teacher.guidance={GUIDANCE}", "data.num_trajectories=16", "data.shard_size=16",
                            "data.batch_size=16", "trainer.max_steps=2", f"eval.num_samples={N}",
                            "eval.nfe=[1,2]", *extra))


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """One tiny guided run through export, then its eval with every solve's and DSNO's labels recorded and
    the final samples kept: (rc, result, finals, seen labels per caller)."""
    from dsno.sampler import Sampler
    from dsno.solvers import reference
    from dsno.teachers.mnist_gmm_cond import main
    root = tmp_path_factory.mktemp("cond")
    main(["--size", "8", "--per-class", "2", "--iters", "5", "--out", str(root / "fit.safetensors")])
    rc = _config(root)
    pipeline.run(rc, through="export")

    seen: dict[str, list[list[int]]] = {"solver": [], "reference": [], "dsno": []}
    captured = {}
    mp = pytest.MonkeyPatch()
    solve, call, write = evaluation.solve, Sampler.__call__, evaluation.write_report

    def recording_solve(teacher, x, *args, cond=None, **kw):
        if cond is not None:
            seen["solver"].append(cond.tolist())
        elif isinstance(teacher, ConditionedTeacher):          # the reference solves a bound teacher
            seen["reference"].append(teacher.labels.tolist())
        return solve(teacher, x, *args, cond=cond, **kw)

    def recording_call(self, x_T, labels=None):
        seen["dsno"].append(labels.tolist())
        return call(self, x_T, labels)

    def capturing_write(result, finals, *args, **kw):
        captured.update(finals=finals)
        return write(result, finals, *args, **kw)

    mp.setattr(evaluation, "solve", recording_solve)            # where eval and the reference look it up
    mp.setattr(reference, "solve", recording_solve)
    mp.setattr(Sampler, "__call__", recording_call)
    mp.setattr(evaluation, "write_report", capturing_write)
    try:
        result = evaluation.run(rc)
    finally:
        mp.undo()
    return rc, result, captured["finals"], seen


def test_every_method_is_scored_on_the_same_labels(conditional_run):
    rc, result, finals, seen = conditional_run
    labels = trajectory_labels(rc.eval.seed, 0, N, build_teacher(rc.teacher).class_weights.tolist()).tolist()
    assert result["conditions"]["labels"] == labels and result["conditions"]["guidance"] == GUIDANCE
    assert len(set(labels)) > 1
    for caller in ("solver", "reference", "dsno"):
        assert seen[caller] and all(s == labels for s in seen[caller]), caller
    saved = json.loads((Path(rc.run_dir) / "eval" / "metrics.json").read_text())
    assert saved["conditions"]["labels"] == labels
    done = [r for r in saved["rows"] if "skipped" not in r]
    assert {"dsno", "ddim-1", "dpm_solver_pp-3", "ddpm"} <= {r["method"] for r in done}
    y = torch.tensor(labels)
    for r in done:                                   # each method's accuracy is its own samples' score
        assert r["label_accuracy"] == pytest.approx(label_accuracy(finals[f"{r['method']}@{r['nfe']}"], y))
    assert result["conditions"]["reference_label_accuracy"] == pytest.approx(label_accuracy(finals["reference"], y))
    report = (Path(rc.run_dir) / "eval" / "report.md").read_text()
    assert "| label accuracy |" in report and "under guidance w=1" in report


def test_the_reference_is_the_guided_solve(conditional_run):
    rc, result, finals, _ = conditional_run
    teacher = build_teacher(rc.teacher)
    y = torch.tensor(result["conditions"]["labels"])
    x_T = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(rc.eval.seed))

    def solve(w):
        return reference_solve(bind(teacher, y, w), prior_state(teacher, x_T), rc.solver.t_end,
                               rc.eval.reference_steps).float()
    guided, unguided = solve(GUIDANCE), solve(0.0)
    assert torch.allclose(finals["reference"], guided, atol=1e-6)
    assert (guided - unguided).abs().max() > 0.05          # guidance moves the reference


def test_the_figure_has_one_row_per_label(conditional_run):
    rc, result, finals, _ = conditional_run
    y = torch.tensor(result["conditions"]["labels"])
    figure = label_figure(result, finals, y)
    classes = sorted(set(y.tolist()))
    assert [label for label, _ in figure.solvers] == [f"label {c}" for c in classes]
    assert figure.top == [] and figure.columns[:3] == ["reference", "teacher (dpm_solver_pp-3), NFE 12",
                                                       "DSNO, one pass"]
    for (_, cells), c in zip(figure.solvers, classes):
        first = int((y == c).nonzero()[0])
        assert torch.equal(cells["DSNO, one pass"][0], finals["dsno@1"][first:first + 1])
        assert torch.equal(cells["reference"][0], finals["reference"][first:first + 1])
    layout = figure.layout()
    png = np.array(Image.open(Path(rc.run_dir) / "eval" / FIGURE_FILE).convert("RGB"))
    assert png.shape[:2] == (layout.size[1], layout.size[0]) and layout.solver_rows == len(classes)


def test_training_on_data_of_another_guidance_or_label_rule_is_refused(conditional_run, tmp_path):
    from dsno.stages import training
    rc, *_ = conditional_run
    root = Path(rc.teacher.path).parent
    for other, key in (("teacher.guidance=2.0", r"teacher\.guidance"),
                       ("data.class_weights=[1,1,1,1,1,1,1,1,1,0]", r"labels\.class_weights")):
        changed = _config(root, f"run_dir={tmp_path / 'other'}", f"data.dir={rc.data.dir}", other)
        with pytest.raises(FingerprintMismatchError, match=key):
            training.run(changed, teacher=build_teacher(changed.teacher))
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_an_unconditional_eval_records_no_labels(tmp_path):
    rc = validate(compose(f"run_dir={tmp_path / 'run'}", *TINY_RUN, "data.num_trajectories=16", "data.shard_size=16",
                          "data.batch_size=16", "trainer.max_steps=2", "eval.num_samples=10", "eval.nfe=[1]"))
    result = pipeline.run(rc) and json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert sorted(result) == ["device", "distillation", "dsno_vs_teacher", "experiment", "fidelity", "num_samples",
                              "reference", "rows", "teacher_eval"]
    dsno, teacher = (next(r for r in result["rows"] if r["method"].startswith(m)) for m in ("dsno", "teacher"))
    assert dsno.get("fid") is None and result["dsno_vs_teacher"] is None     # this tiny eval computes no FID
    assert [r for r in result["rows"] if "label_accuracy" in r] == []
    assert "label accuracy" not in (tmp_path / "run" / "eval" / "report.md").read_text()


def test_label_accuracy_is_scored_only_for_a_conditional_digit_teacher(conditional_run):
    rc, *_ = conditional_run
    teacher = build_teacher(rc.teacher)
    assert evaluation.scores_labels(rc, teacher, (1, 8, 8))
    assert not evaluation.scores_labels(rc, teacher, (3, 8, 8))            # not the digit classifier's images
    plain = validate(compose("run_dir=/tmp/unused", *TINY_RUN))
    assert not evaluation.scores_labels(plain, build_teacher(plain.teacher), (1, 16, 16))
    assert evaluation.eval_labels(plain, build_teacher(plain.teacher), N) is None


def test_the_wandb_table_gains_label_accuracy_only_when_scored():
    from dsno.loggers import EVAL_COLUMNS, eval_columns
    plain = [{"method": "dsno", "nfe": 1, "rmse_vs_reference": 0.1}]
    assert eval_columns(plain) == EVAL_COLUMNS
    scored = [{**plain[0], "label_accuracy": 0.9}, {"method": "ddim-1", "nfe": 1, "skipped": "x"}]
    assert eval_columns(scored) == [*EVAL_COLUMNS[:3], "label_accuracy", *EVAL_COLUMNS[3:]]


def test_a_complete_conditional_run_is_kept_and_another_guidance_is_not(conditional_run):
    from dsno.run_files import CHECKPOINT_DIR
    from dsno.stages import completion
    rc, *_ = conditional_run
    weights = sorted((Path(rc.run_dir) / CHECKPOINT_DIR).glob("*"))
    before = {p: p.stat().st_mtime_ns for p in weights}
    pipeline.run(rc, through="export")                     # complete for this config: nothing redone
    assert {p: p.stat().st_mtime_ns for p in weights} == before
    root = Path(rc.teacher.path).parent
    assert completion.is_complete(_config(root), "train")
    assert not completion.is_complete(_config(root, "teacher.guidance=2.0"), "train")
