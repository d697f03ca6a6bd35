"""USF solver schedules: YAML round trip, the executor equals the named solvers (float64, exact teachers),
and each invalid solver schedule is refused with one clear line."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

import dsno
from dsno.errors import UserError
from dsno.solvers import nfe, steps_for_nfe, timesteps, usf
from dsno.solvers.coefficients import ADAMS_BASHFORTH, adams_weights
from dsno.solvers.usf import SolverSchedule, SolverScheduleError, Step
from dsno.teachers import GaussianMixture

CASES = [
    ("ddim", 1, {}),
    ("dpm_solver_pp", 1, {}),
    ("dpm_solver_pp", 2, {}),
    ("dpm_solver_pp", 3, {}),
    ("dpm_solver_pp", 3, {"solver_type": "heun"}),
    ("dpm_solver_pp", 3, {"lower_order_final": False}),
    ("unipc", 3, {}),
    ("unipc", 2, {"variant": "bh1"}),
    ("unipc", 3, {"predict_x0": False}),
    ("unipc", 3, {"use_corrector": False}),
    ("deis", 3, {"variant": "logrho"}),
    ("deis", 4, {"variant": "logrho"}),
    ("ipndm", 2, {}),
    ("ipndm", 3, {}),
    ("ipndm", 4, {}),
    ("ipndm", 4, {"lower_order_final": False}),
]


def mixture():
    g = torch.Generator().manual_seed(3)
    return GaussianMixture(torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64) * 0.7,
                           0.02 + 0.3 * torch.rand(5, generator=g, dtype=torch.float64),
                           torch.rand(5, generator=g, dtype=torch.float64) + 0.2)


def single_gaussian():
    return GaussianMixture(torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64))


@pytest.mark.parametrize("teacher_fn", [mixture, single_gaussian])
@pytest.mark.parametrize("steps", [3, 7, 12])
@pytest.mark.parametrize("name,order,opts", CASES)
def test_solver_schedule_equals_named_solver(teacher_fn, steps, name, order, opts):
    teacher = teacher_fn()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts = timesteps(teacher.schedule, steps=steps, spacing="time_quadratic")
    want = dsno.solve(teacher, x, ts, solver=name, order=order, **opts)
    sched = usf.from_solver(name, ts, order, **dict(opts))
    got = dsno.solve(teacher, x, solver="usf", solver_schedule=sched)
    assert float((got - want).abs().max()) < 1e-10
    traj = dsno.solve(teacher, x, solver="usf", solver_schedule=sched, return_trajectory=True)
    assert traj.shape == (steps + 1, *x.shape) and torch.equal(traj[-1], got)
    assert nfe("usf", steps, solver_schedule=sched) == nfe(name, steps, order=order, **opts) == sched.nfe


def test_adams_weights_are_adams_bashforth_and_moulton():
    """Equal-step nodes at minus the lags: the textbook AB-4 and AM-4 (with the corrector's node at +1)
    weights, and the polynomial integral is exact: a cubic in r integrates to its mean over [0, 1]."""
    assert np.allclose(adams_weights([-1, -2, -3]) * 24, [55, -59, 37, -9], atol=1e-12)
    assert np.allclose(adams_weights([1, -1, -2]) * 24, [19, 9, -5, 1], atol=1e-12)
    assert np.allclose(adams_weights([1]), [0.5, 0.5], atol=1e-15)
    for k, table in ADAMS_BASHFORTH.items():                  # the iPNDM table, every order
        assert np.allclose(adams_weights([-m for m in range(1, k)]), table, atol=1e-13)
    nodes = [0.0, -1.0, -3.0, 0.5]
    cubic = [1.0 - 2 * r + 0.7 * r**3 for r in nodes]
    assert abs(float(adams_weights(nodes[1:]) @ np.asarray(cubic)) - (1.0 - 1.0 + 0.7 / 4)) < 1e-13


def test_adams_corrector_raises_the_order_on_a_single_gaussian():
    """iPNDM-2 with the Adams-Moulton pseudo-corrector converges faster than without it, at the same NFE
    (exact ODE solution of a single Gaussian; time_uniform grids of 8, 16, 32 steps). Measured orders
    between 16 and 32 steps: 1.80 without, 2.80 with."""
    teacher = single_gaussian()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = teacher.ode_solution(x, 1.0, 1e-3)
    errs = {}
    for corr in ("none", "pseudo"):
        for steps in (8, 16, 32):
            ts = timesteps(teacher.schedule, steps=steps, spacing="time_uniform")
            base = usf.from_solver("ipndm", ts, 2, lower_order_final=False)
            sched = SolverSchedule(ts=base.ts, steps=tuple(replace(st, corrector=corr if i < steps - 1 else "none")
                                                     for i, st in enumerate(base.steps))).declared()
            assert sched.cost == steps
            errs[corr, steps] = float((dsno.solve(teacher, x, solver="usf", solver_schedule=sched) - exact).abs().max())
    assert all(errs["pseudo", n] < errs["none", n] for n in (8, 16, 32))
    order = {c: math.log2(errs[c, 16] / errs[c, 32]) for c in ("none", "pseudo")}
    assert 1.6 < order["none"] < 2.1 and order["pseudo"] > order["none"] + 0.7, order


def test_yaml_round_trip(tmp_path):
    ts = timesteps(dsno.VPSchedule.linear(), steps=5, spacing="logsnr").tolist()
    steps = [Step(), Step("noise", 2, (1,), 1, "linear", 0.137, "pseudo"), Step("data", 3, (1, 2), 2, "bh2"),
             Step("data", 2, (1, 3, 2), 2, "linear", -0.02, "pseudo"), Step("noise", 4, (1, 2, 3), 3, "adams")]
    s = SolverSchedule(ts=tuple(ts), steps=tuple(steps), afs="mean", info={"score": {"rmse": 0.1}}).declared()
    p = usf.save(s, tmp_path / "s.yaml")
    back = usf.load(p)
    assert back == s and back.ts == s.ts and back.info["score"] == {"rmse": 0.1} and back.nfe == 4
    assert yaml.safe_load(p.read_text())["nfe"] == 4
    assert usf.load(usf.to_dict(back)) == s
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(dsno.solve(mixture(), x, solver="usf", solver_schedule=str(p)),
                       dsno.solve(mixture(), x, solver="usf", solver_schedule=s))
    assert steps_for_nfe("usf", 4, solver_schedule=s) == 5


def test_afs_saves_one_evaluation_and_uses_the_mean():
    teacher = mixture()
    calls = []
    orig = teacher.forward
    teacher.forward = lambda x, t: (calls.append(1), orig(x, t))[1]
    ts = timesteps(teacher.schedule, steps=6, spacing="logsnr")
    base = usf.from_solver("unipc", ts, 3)
    for afs, cost in (("none", 6), ("zero", 5), ("mean", 5)):
        calls.clear()
        s = SolverSchedule(ts=base.ts, steps=base.steps, afs=afs).declared()
        dsno.solve(teacher, torch.randn(4, 1, 4, 4, dtype=torch.float64), solver="usf", solver_schedule=s)
        assert len(calls) == cost == s.nfe
    mean = usf.data_mean(teacher)
    w = teacher.log_weights.exp()
    assert torch.allclose(mean.reshape(-1), (w[:, None] * teacher.means).sum(0))


def test_solver_schedule_converges_on_single_gaussian():
    """A third-order data solver schedule with pseudo-correctors converges at order > 2 to the exact solution."""
    teacher = single_gaussian()
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errs = []
    for n in (40, 80):
        ts = timesteps(teacher.schedule, steps=n, spacing="logsnr")
        exact = teacher.ode_solution(x, float(ts[0]), float(ts[-1]))
        s = usf.from_solver("unipc", ts, 3)
        errs.append(float((dsno.solve(teacher, x, solver="usf", solver_schedule=s) - exact).abs().max()))
    assert math.log2(errs[0] / errs[1]) > 2.5


def _dict(**over):
    ts = [1.0, 0.5, 0.1, 0.001]
    d = {"nfe": 3, "afs": "none", "timesteps": ts,
         "steps": [{"order": 1}, {"order": 2, "points": [1]}, {"order": 2, "points": [1]}]}
    d.update(over)
    return d


BAD = [
    (_dict(timesteps=[1.0, 0.1, 0.5, 0.001]), "timesteps must strictly decrease"),
    (_dict(steps=[{"order": 1}, {"order": 3, "points": [1]}, {"order": 1}]), "steps[1].order=3 needs est_order >= 2"),
    (_dict(steps=[{"order": 1}, {"order": 3, "points": [1, 2]}, {"order": 1}]), "steps[1].points=[1, 2] uses the "
     "evaluation 2 steps back, but only 1 exist before step 1"),
    (_dict(steps=[{"order": 2, "points": [1]}, {"order": 1}, {"order": 1}]), "steps[0].points=[1] uses the "
     "evaluation 1 steps back, but none exist before step 0"),
    (_dict(nfe=4), "declares nfe=4, but its 3 steps with afs=none cost 3 model evaluations; set nfe: 3"),
    (_dict(afs="mean"), "declares nfe=3, but its 3 steps with afs=mean cost 2"),
    (_dict(steps=[{"order": 1}, {"order": 5, "points": [1]}, {"order": 1}]), "steps[1].order=5 must be an integer in 1..4"),
    (_dict(steps=[{"order": 1}, {"order": 1}]), "4 timesteps make 3 steps, but steps lists 2"),
    (_dict(steps=[{"order": 1}, {"order": 1}, {"order": 1, "corrector": "pseudo"}]),
     "steps[2].corrector=pseudo on the last step would cost one more model evaluation"),
    (_dict(steps=[{"order": 1, "prediction": "velocity"}, {"order": 1}, {"order": 1}]),
     "steps[0].prediction='velocity' must be one of data, noise"),
    (_dict(steps=[{"order": 1}, {"order": 2, "points": [1], "relax": "bh2", "coef": 0.1}, {"order": 1}]),
     "coef=0.1 applies to relax=linear only"),
    (_dict(colour="red"), "unknown key 'colour'"),
    (_dict(steps=[{"order": 1}, {"order": 2, "points": [1], "est_order": 1, "relax": "adams"},
                  {"order": 2, "points": [1, 2], "est_order": 2, "relax": "adams"}]),
     "steps[2]: relax=adams of order=2 takes exactly 1 points and est_order=1"),
    ({"timesteps": [1.0, 0.001], "steps": [{"order": 1}]}, "missing key 'nfe'"),
]


@pytest.mark.parametrize("d,msg", BAD)
def test_bad_solver_schedules_one_line(d, msg, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(SolverScheduleError) as e:
        usf.load(p)
    text = str(e.value)
    assert msg in text and "\n" not in text and text.startswith(f"solver schedule {p}: ")
    assert isinstance(e.value, UserError)


def test_bad_use_one_line(tmp_path):
    teacher = mixture()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(SolverScheduleError, match=r"^solver schedule file .*missing\.yaml does not exist; .*"
                                                  r"runs/<experiment>/solver_schedules/nfe<N>\.yaml"):
        dsno.solve(teacher, x, solver="usf", solver_schedule=str(tmp_path / "missing.yaml"))
    with pytest.raises(SolverScheduleError, match="solver 'usf' needs solver_schedule=PATH .*solver.solver_schedule=PATH"):
        dsno.solve(teacher, x, solver="usf")
    s = usf.from_solver("unipc", timesteps(teacher.schedule, steps=5), 3)
    with pytest.raises(SolverScheduleError, match="differs from the solver schedule's timesteps"):
        dsno.solve(teacher, x, timesteps(teacher.schedule, steps=6), solver="usf", solver_schedule=s)
    with pytest.raises(SolverScheduleError, match="uses Taylor order 3, above order=2"):
        dsno.solve(teacher, x, solver="usf", order=2, solver_schedule=s)
    (tmp_path / "junk.yaml").write_text("nfe: [1\n")
    with pytest.raises(SolverScheduleError, match="not valid YAML"):
        usf.load(tmp_path / "junk.yaml")
    with pytest.raises(ValueError, match="needs a grid ts"):
        dsno.solve(teacher, x, solver="ddim")
    with pytest.raises(ValueError, match="solver 'usf' has no option 'schedule'; its options are: solver_schedule"):
        dsno.solve(teacher, x, solver="usf", schedule=s)          # the old name of the option
    with pytest.raises(AttributeError, match=r"^dsno.solvers.usf.Schedule was renamed: use "
                                             r"dsno.solvers.usf.SolverSchedule$"):
        usf.Schedule
