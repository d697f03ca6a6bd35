"""The USF search on a guided class-conditional teacher: its noise batches carry labels drawn by the data
stage's rule from the search seed, the reference and every candidate run on the teacher bound to them
under its guidance, the label rule and the guidance are part of the fingerprint a resume must match, and
a conditional teacher without an unconditional branch is searched too (it always gets labels)."""

import json

import pytest
import torch

from dsno.data.generate import label_rule, trajectory_labels
from dsno.search import SearchConfig, SearchError, loop, search
from dsno.search.conditioning import Conditioning
from dsno.solvers import timesteps, usf
from dsno.solvers.reference import reference_solve
from dsno.teachers.conditional import LabelError
from dsno.teachers.gmm_cond import ConditionalGaussianMixture
from test_usf_search import TINY, mixture

GUIDANCE = 2.0
SHAPE = (1, 4, 4)


def conditional_mixture(guidance=GUIDANCE, cls=ConditionalGaussianMixture):
    """Six components of three classes, 1x4x4, exact; guidance scale `guidance`."""
    g = torch.Generator().manual_seed(3)
    return cls(torch.randn(6, *SHAPE, generator=g, dtype=torch.float64) * 0.7,
               0.02 + 0.2 * torch.rand(6, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2]),
               torch.rand(6, generator=g, dtype=torch.float64) + 0.2, guidance=guidance)


class WithoutNullLabel(ConditionalGaussianMixture):
    """The same mixture, as a conditional teacher that has no unconditional branch (it needs labels)."""

    supports_guidance = False


def verify_batch(teacher, sc):
    """The verification noise and labels of search.seed, made here from the documented rules."""
    seed = loop.noise_seeds(sc.seed)[1]
    x = torch.randn(sc.verify_batch, *SHAPE, generator=torch.Generator().manual_seed(seed)).double()
    labels = torch.from_numpy(trajectory_labels(seed, 0, sc.verify_batch, teacher.class_weights.tolist()))
    return x, labels


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    out = tmp_path_factory.mktemp("guided")
    teacher = conditional_mixture()
    return teacher, out, search(teacher, 4, SearchConfig(**TINY), out, 1e-3, torch.float64, progress=False)


def test_the_guided_search_beats_the_base_solver_against_the_guided_reference(guided):
    """Scored here from scratch on the verification batch and the guided reference: the winner's reported
    RMSE is its RMSE there, and it beats UniPC-3 on the logSNR grid at the same NFE."""
    teacher, out, res = guided
    sc = SearchConfig(**TINY)
    x, labels = verify_batch(teacher, sc)
    bound = teacher.conditioned(labels, GUIDANCE)
    ref = reference_solve(bound, x, 1e-3, sc.reference_steps)
    winner = usf.load(out / "nfe4.yaml")
    assert loop._score(bound, winner, x, ref) == pytest.approx(res["score"]["rmse_verify"], rel=1e-12)
    base = usf.from_solver("unipc", timesteps(teacher.schedule, steps=4, spacing="logsnr"), 3)
    base_rmse = loop._score(bound, base, x, ref)
    assert res["score"]["rmse_verify"] < 0.5 * base_rmse, (res["score"]["rmse_verify"], base_rmse)   # 0.074, 0.327
    assert winner.info["search"]["guidance"] == GUIDANCE
    assert winner.info["search"]["class_weights"] == pytest.approx(teacher.class_weights.tolist())


def test_the_batches_are_labelled_and_their_reference_is_the_guided_one(tmp_path):
    teacher = conditional_mixture()
    sc = SearchConfig(**TINY)
    conditioning = Conditioning.of(teacher)
    batch, verify = loop.noise_batches(teacher, sc, SHAPE, torch.float64, 1e-3, conditioning, tmp_path)
    x, labels = verify_batch(teacher, sc)
    assert torch.equal(verify.x, x) and torch.equal(verify.labels, labels) and len(set(labels.tolist())) == 3
    assert torch.equal(batch.labels, torch.from_numpy(trajectory_labels(loop.noise_seeds(0)[0], 0, sc.batch,
                                                                        teacher.class_weights.tolist())))
    assert verify.teacher.guidance == GUIDANCE and torch.equal(verify.teacher.labels, labels)
    guided_ref = reference_solve(teacher.conditioned(labels, GUIDANCE), x, 1e-3, sc.reference_steps)
    assert torch.equal(verify.ref, guided_ref)
    for other in (teacher.conditioned(labels, 0.0), teacher.marginal()):          # unguided, unconditional
        assert float((reference_solve(other, x, 1e-3, sc.reference_steps) - guided_ref).abs().max()) > 0.05
    # the cached references are those of these labels: other class weights get their own files
    names = {p.name for p in tmp_path.iterdir()}
    again = loop.noise_batches(teacher, sc, SHAPE, torch.float64, 1e-3, conditioning, tmp_path)[1]
    assert torch.equal(again.ref, guided_ref) and {p.name for p in tmp_path.iterdir()} == names
    loop.noise_batches(teacher, sc, SHAPE, torch.float64, 1e-3, Conditioning.of(teacher, [1.0, 1.0, 4.0]), tmp_path)
    assert len({p.name for p in tmp_path.iterdir()} - names) == 2


def test_another_guidance_or_label_weights_refuse_to_resume_by_name(guided):
    teacher, out, _ = guided
    sc = SearchConfig(**TINY)
    fp = json.loads((out / "nfe4.scored.json").read_text())["fingerprint"]
    assert fp["guidance"] == GUIDANCE and fp["labels"] == label_rule(teacher.class_weights.tolist())
    for other, weights, key in ((conditional_mixture(1.0), None, "guidance"),
                                (conditional_mixture(), [1.0, 1.0, 4.0], "labels")):
        with pytest.raises(SearchError, match=rf"belongs to another search \({key} differs\); delete it, set "
                                              rf"search.resume=false, or search.out=ANOTHER_DIR$") as e:
            search(other, 4, sc, out, 1e-3, torch.float64, progress=False, class_weights=weights)
        assert "\n" not in str(e.value)


def test_a_conditional_teacher_without_an_unconditional_branch_is_searched_on_labels(tmp_path):
    teacher = conditional_mixture(guidance=0.0, cls=WithoutNullLabel)
    with pytest.raises(LabelError, match="without an unconditional branch"):
        teacher.eps(torch.zeros(2, *SHAPE, dtype=torch.float64), 0.5)
    sc = SearchConfig(**{**TINY, "mode": "timesteps", "rounds": 1, "refine": 1})
    res = search(teacher, 3, sc, tmp_path, 1e-3, torch.float64, progress=False)
    x, labels = verify_batch(teacher, sc)
    bound = teacher.conditioned(labels)
    ref = reference_solve(bound, x, 1e-3, sc.reference_steps)
    assert loop._score(bound, res["solver_schedule"], x, ref) == pytest.approx(res["score"]["rmse_verify"], rel=1e-12)
    assert json.loads((tmp_path / "nfe3_timesteps.scored.json").read_text())["fingerprint"]["guidance"] == 0.0


@pytest.mark.parametrize("make,weights,msg", [
    (conditional_mixture, [1.0, 1.0], r"^class weights \[1.0, 1.0\]: need one weight per class of teacher gmm_cond "
                                      r"\(3 classes\)$"),
    (conditional_mixture, [0.0, 0.0, 0.0], r"^class weights \[0.0, 0.0, 0.0\]: must be finite numbers >= 0, one per "
                                           r"class of teacher gmm_cond \(3 classes\), not all 0$"),
    (conditional_mixture, ["a", 1.0, 1.0], r"^class weights \['a', 1.0, 1.0\]: must be finite numbers"),
    (mixture, [1.0], r"^class weights \[1.0\] are for a class-conditional teacher; teacher gmm is unconditional: "
                     r"drop them$"),
])
def test_label_weights_that_do_not_fit_are_one_line(tmp_path, make, weights, msg):
    with pytest.raises(SearchError, match=msg):
        search(make(), 4, SearchConfig(**TINY), tmp_path, 1e-3, torch.float64, progress=False, class_weights=weights)
    assert not any(tmp_path.iterdir())


def test_the_cli_searches_the_guided_digit_teacher_with_the_data_stages_label_weights(tmp_path):
    """python -m dsno.search teacher=mnist_gmm_cond teacher.guidance=W (the run's glue, in process): labels
    drawn with data.class_weights, guidance teacher.guidance."""
    from dsno.config import compose
    from dsno.search.cli import run
    weights = [1.0] * 9 + [3.0]
    cfg = compose("schema=search", f"run_dir={tmp_path}/run", "teacher=mnist_gmm_cond", "teacher.guidance=1.5",
                  f"data.class_weights=[{','.join(map(str, weights))}]", "nfe=3", "search.mode=timesteps",
                  "search.batch=8", "search.verify_batch=8", "search.reference_steps=30", "search.initial=4",
                  "search.rounds=1", "search.proposals=10", "search.scored_per_round=3", "search.verify_top=2",
                  "search.refine=0")
    res = run(cfg)
    fp = json.loads((tmp_path / "run" / "solver_schedules" / "nfe3_timesteps.scored.json").read_text())["fingerprint"]
    assert fp["guidance"] == 1.5 and fp["labels"] == label_rule(weights) and fp["teacher"]["guidance"] == 1.5
    assert res["search"]["guidance"] == 1.5 and res["search"]["class_weights"][-1] == pytest.approx(3 / 12)
