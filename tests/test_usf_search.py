"""The S^3 search: the predictor ranks held-out candidates better than chance, an interrupted
search resumes to the same result, bad settings are one line, and searched solver schedules reach
data_gen and eval."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dsno
from dsno.search import Predictor, SearchConfig, SearchError, Space, kendall_tau, search
from dsno.search import loop
from dsno.search.space import encode, mutate, random_solver_schedule
from dsno.solvers import timesteps, usf
from dsno.teachers import GaussianMixture

ROOT = Path(__file__).resolve().parent.parent


def mixture():
    g = torch.Generator().manual_seed(3)
    return GaussianMixture(torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64) * 0.7,
                           0.02 + 0.2 * torch.rand(6, generator=g, dtype=torch.float64),
                           torch.rand(6, generator=g, dtype=torch.float64) + 0.2)


TINY = dict(batch=32, verify_batch=32, reference_steps=60, initial=20, rounds=2, proposals=40, scored_per_round=8,
            verify_top=3)


def test_random_and_mutated_solver_schedules_are_valid_and_keep_the_budget():
    teacher = mixture()
    space = Space(schedule=teacher.schedule, nfe=5, t_start=1.0, t_end=1e-3, pins=(0.25, 0.0625))
    rng = np.random.default_rng(0)
    seen_adams = False
    for _ in range(200):
        s = random_solver_schedule(space, rng)
        for c in (s, mutate(space, s, rng)):
            assert usf.validate(c).cost == 5
            assert 0.25 in c.ts and 0.0625 in c.ts and c.ts[0] == 1.0 and c.ts[-1] == 1e-3
            assert encode(space, c).shape == ((5 + 1) * 17 + 3,)
            seen_adams = seen_adams or any(st.relax == "adams" for st in c.steps)
    assert seen_adams


def test_predictor_ranks_held_out_candidates_better_than_chance():
    """Kendall tau on 80 held-out random solver schedules, predictor trained on 160 others: measured 0.365
    (chance: 0)."""
    teacher = mixture()
    space = Space(schedule=teacher.schedule, nfe=4, t_start=1.0, t_end=1e-3)
    x = torch.randn(64, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = loop.reference(teacher, x, 1e-3, 200, None)
    rng = np.random.default_rng(1)
    cands = [random_solver_schedule(space, rng) for _ in range(240)]
    y = np.log(np.minimum([loop._score(teacher, s, x, ref) for s in cands], loop.MAX_RMSE))
    f = np.stack([encode(space, s) for s in cands])
    pred = Predictor(seed=0).fit(f[:160], y[:160]).predict(f[160:])
    tau = kendall_tau(pred, y[160:])
    assert tau > 0.3, tau


def test_reference_of_a_network_teacher_keeps_its_float32_network_and_a_float64_state(tmp_path):
    """As eval's reference: the solve's state is float64, the network runs in its own float32 (the
    teacher is left as it was), within float32 rounding of the all-float64 solve; cached bit for bit."""
    from dsno.teachers.unet import UNetTeacher
    teacher = UNetTeacher(dict(in_channels=1, out_channels=1, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                               attn_resolutions=[4], image_size=8))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cache = tmp_path / "ref.safetensors"
    ref = loop.reference(teacher, x, 1e-3, 20, cache)
    assert ref.dtype == torch.float64 and next(teacher.parameters()).dtype == torch.float32
    grid = timesteps(teacher.schedule, steps=20, spacing="logsnr", t_end=1e-3)
    with torch.no_grad():
        assert torch.equal(ref, dsno.solve(teacher, x.double(), grid, solver="dpm_solver_pp", order=3))
        all64 = dsno.solve(teacher.double(), x.double(), grid, solver="dpm_solver_pp", order=3)
    gap = float((ref - all64).abs().max())
    assert 0.0 < gap < 1e-4, gap
    assert torch.equal(loop.reference(teacher, x, 1e-3, 20, cache), ref)


def test_search_resumes_to_the_same_result(tmp_path, monkeypatch):
    teacher = mixture()
    sc = SearchConfig(**TINY)
    full = search(teacher, 4, sc, tmp_path / "a", 1e-3, torch.float64, progress=False)
    scored_a = json.loads((tmp_path / "a" / "nfe4.scored.json").read_text())["scored"]

    calls = {"n": 0}
    real = loop._score

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 60:                       # inside round 1 (after the initial population)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(loop, "_score", flaky)
    with pytest.raises(KeyboardInterrupt):
        search(teacher, 4, sc, tmp_path / "b", 1e-3, torch.float64, progress=False)
    state = json.loads((tmp_path / "b" / "nfe4.scored.json").read_text())
    assert 0 < len(state["scored"]) < len(scored_a) and not (tmp_path / "b" / "nfe4.yaml").exists()
    monkeypatch.setattr(loop, "_score", real)
    again = search(teacher, 4, sc, tmp_path / "b", 1e-3, torch.float64, progress=False)
    scored_b = json.loads((tmp_path / "b" / "nfe4.scored.json").read_text())["scored"]
    assert [r["rmse"] for r in scored_b] == [r["rmse"] for r in scored_a]
    assert again["solver_schedule"] == full["solver_schedule"]
    assert again["score"]["rmse_verify"] == full["score"]["rmse_verify"]
    written = usf.load(tmp_path / "b" / "nfe4.yaml")
    assert written.nfe == 4 and written.info["cost"]["teacher_calls"] > 0
    assert math.isfinite(written.info["score"]["rmse_verify"])
    # a different search refuses the file, in one line
    with pytest.raises(SearchError, match=r"belongs to another search \(batch differs\)") as e:
        search(teacher, 4, SearchConfig(**{**TINY, "batch": 16}), tmp_path / "b", 1e-3, torch.float64, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("base,order", [(b, o) for b in loop.BASES for o in (1, 3) if not (b == "ddim" and o > 1)])
def test_timestep_only_mode_runs_every_base(base, order):
    """Every search.base draws solver schedules of that solver (deis through its logrho variant), and the
    seeds are the base on each library spacing."""
    teacher = mixture()
    space = Space(schedule=teacher.schedule, nfe=4, t_start=1.0, t_end=1e-3, mode="timesteps", base=base,
                  base_order=order)
    s = random_solver_schedule(space, np.random.default_rng(0))
    opts = {"variant": "logrho"} if base == "deis" else {}
    assert s.steps == usf.from_solver(base, s.ts, order, **opts).steps and s.cost == 4
    seeds = loop.seeded_solver_schedules(space)
    assert len(seeds) == 4 and all(x.steps == s.steps for x in seeds)


def test_refinement_only_moves_times_and_never_loses(tmp_path):
    """The coordinate descent after the rounds scores candidates that differ from the best of the
    rounds in their times only, and the best after it is at least as good; refine=0 skips it."""
    teacher = mixture()
    res = search(teacher, 4, SearchConfig(**TINY), tmp_path, 1e-3, torch.float64, progress=False)
    scored = json.loads((tmp_path / "nfe4.scored.json").read_text())["scored"]
    before = [r for r in scored if r["round"] <= TINY["rounds"] and not r.get("duplicate")]
    refined = [r for r in scored if r["round"] == TINY["rounds"] + 1]
    best = min(before, key=lambda r: r["rmse"])
    assert 0 < len(refined) <= 2 * 3 * 4
    first = usf.from_dict(refined[0]["schedule"])
    assert first.steps == usf.from_dict(best["schedule"]).steps and first.ts != tuple(best["schedule"]["timesteps"])
    assert min(r["rmse"] for r in scored if not r.get("duplicate")) <= best["rmse"]
    assert res["search"]["refine"] == 3
    none = search(teacher, 4, SearchConfig(**{**TINY, "refine": 0}), tmp_path / "b", 1e-3, torch.float64, progress=False)
    assert none["cost"]["candidates_scored"] == len(before)


def test_search_beats_its_seeds_and_timestep_only_mode_keeps_the_base(tmp_path):
    teacher = mixture()
    res = search(teacher, 4, SearchConfig(**TINY), tmp_path, 1e-3, torch.float64, progress=False)
    ts_only = search(teacher, 4, SearchConfig(**{**TINY, "mode": "timesteps"}), tmp_path, 1e-3, torch.float64,
                     progress=False)
    s = ts_only["solver_schedule"]
    base = usf.from_solver("unipc", s.ts, 3)
    assert s.steps == base.steps and s.afs == "none" and (tmp_path / "nfe4_timesteps.yaml").is_file()
    x = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(loop.noise_seeds(0)[1])).double()
    ref = loop.reference(teacher, x, 1e-3, 60, None)
    logsnr = usf.from_solver("unipc", timesteps(teacher.schedule, steps=4, spacing="logsnr"), 3)
    assert res["score"]["rmse_verify"] <= loop._score(teacher, logsnr, x, ref) + 1e-12


@pytest.mark.parametrize("args,msg", [
    (["nfe=0"], "config error: nfe=0: must be an integer in 1..50"),
    (["search.mode=grid"], "config error: search.mode='grid': must be one of full, timesteps"),
    (["search.pin_times=[2.0]"], "config error: search.pin_times=[2.0]: must be distinct times strictly between"),
    (["search.batch=0"], "config error: search.batch=0: must be a positive integer"),
    (["search.refine=-1"], "config error: search.refine=-1: must be an integer >= 0"),
    (["search.batches=64"], "search.batches"),
    (["search.batch=many"], "search.batch"),
])
def test_cli_bad_settings_are_one_line(tmp_path, args, msg):
    p = subprocess.run([sys.executable, "-m", "dsno.search", f"run_dir={tmp_path}/run", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], p.stderr
    assert not (tmp_path / "run" / "solver_schedules").exists()


def test_an_experiment_sizes_its_search_and_train_checks_those_keys():
    """The UNet experiments carry a CPU-sized search (conf/experiment/mnist_unet_cpu.yaml, inherited by
    the default mnist_unet_quick); the mixture keeps the schema's; a misspelt search key in a run
    config is a one-line config error for train as for the search."""
    from omegaconf import OmegaConf
    from dsno.config import ConfigError, SearchConfig, compose, validate
    from dsno.search.cli import split
    rc, nfe, sc = split(compose("schema=search", "nfe=10"))
    assert rc.experiment == "mnist_unet_quick" and nfe == 10
    assert (sc.batch, sc.verify_batch, sc.reference_steps, sc.initial, sc.rounds) == (128, 256, 100, 150, 8)
    assert split(compose("schema=search", "experiment=mnist_gmm"))[2] == SearchConfig()
    d = OmegaConf.to_container(compose(), resolve=False)
    d["search"]["batches"] = 3                      # as a user's experiment file might hold it
    with pytest.raises(ConfigError, match=r"search\.batches") as e:
        validate(OmegaConf.create(d))
    assert "\n" not in str(e.value)


def _pinned_schedule(tmp_path, times):
    teacher = mixture()
    ts = [1.0, 0.8, *times[:-1], 0.03, times[-1]]
    ts = sorted(set(ts), reverse=True)
    s = usf.from_solver("unipc", ts, 3)
    return usf.save(s, tmp_path / "pinned.yaml"), s, teacher


def test_data_gen_makes_trajectories_with_a_solver_schedule(tiny_run, tmp_path):
    from dsno.config import ConfigError
    from dsno.builders import solver_grid
    from dsno.stages import trajectories
    times = [0.5625, 0.25, 0.0625, 0.001]
    path, s, _ = _pinned_schedule(tmp_path, times)
    rc = tiny_run("solver=usf", f"solver.solver_schedule={path}")
    from dsno.builders import build_teacher
    teacher = build_teacher(rc.teacher)
    grid = solver_grid(teacher, rc.solver, times)
    assert grid.tolist() == list(s.ts)
    solve = trajectories.make_solve(teacher, rc.solver, grid, times)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    states = solve(x)
    direct = dsno.solve(teacher, x.double(), solver="usf", solver_schedule=s, return_trajectory=True)
    idx = [s.ts.index(t) for t in times]
    assert states.shape == (3, 4, 1, 16, 16)
    assert torch.allclose(states, direct[idx].transpose(0, 1).float())
    assert "solver_schedule_sha256" in trajectories.solver_spec(rc.solver)
    off = usf.save(usf.from_solver("unipc", timesteps(teacher.schedule, steps=5), 3), tmp_path / "off.yaml")
    with pytest.raises(ConfigError, match=r"does not pass through the output times \[0.5625, 0.25, 0.0625\]"):
        tiny_run("solver=usf", f"solver.solver_schedule={off}")
    with pytest.raises(ConfigError, match="solver=usf needs solver.solver_schedule=PATH"):
        tiny_run("solver=usf")


def test_eval_lists_every_solver_schedule(tiny_run, tmp_path):
    from dsno.stages.evaluation import solver_schedule_runs
    rc = tiny_run()
    d = Path(rc.run_dir) / "solver_schedules"
    teacher = mixture()
    usf.save(usf.from_solver("unipc", timesteps(teacher.schedule, steps=5), 3), d / "nfe5.yaml")
    usf.save(usf.from_solver("ddim", timesteps(teacher.schedule, steps=3), 1), d / "nfe3_timesteps.yaml")
    (d / "broken.yaml").write_text("nfe: 3\n")
    runs = {r.method: r for r in solver_schedule_runs(rc)}
    assert set(runs) == {"usf nfe5", "usf nfe3_timesteps", "usf broken"}
    assert runs["usf nfe5"].nfe == 5 and runs["usf nfe3_timesteps"].nfe == 3
    assert "missing key 'timesteps'" in runs["usf broken"].skipped


def test_a_run_folder_with_the_old_schedules_folder_is_refused_before_eval_or_search(tiny_run, tmp_path):
    from dsno.config import check_run
    from dsno.errors import UserError
    from dsno.stages.evaluation import solver_schedule_runs
    rc = tiny_run()
    check_run(rc, "eval")
    old = Path(rc.run_dir) / "schedules"
    usf.save(usf.from_solver("ddim", timesteps(mixture().schedule, steps=3), 1), old / "nfe3.yaml")
    line = (rf"^{old} is the old name of the folder of solver schedules: rename it "
            rf"\(mv {old} {Path(rc.run_dir) / 'solver_schedules'}\)$")
    for check in (lambda: check_run(rc, "eval"), lambda: check_run(rc, "pipeline"), lambda: check_run(rc, "search"),
                  lambda: solver_schedule_runs(rc)):
        with pytest.raises(UserError, match=line):
            check()
    check_run(tiny_run(f"search.out={tmp_path / 'elsewhere'}"), "search")      # a search that writes elsewhere
    old.rename(Path(rc.run_dir) / "solver_schedules")
    assert [r.method for r in solver_schedule_runs(rc)] == ["usf nfe3"]


def test_data_set_fingerprints_are_pinned(tiny_run, tmp_path):
    """A data set made before a refactor must still be found: the fingerprint's bytes stay (the default
    solver's and usf's, whose entries its registry hook supplies)."""
    import hashlib
    import json
    from dsno.builders import build_teacher, state_shape
    from dsno.data.manifest import Manifest, check_fingerprint
    from dsno.stages.trajectories import expected_fingerprint
    path, _, _ = _pinned_schedule(tmp_path, [0.5625, 0.25, 0.0625, 0.001])
    digests = {}
    for name, extra in (("default", ()), ("usf", ("solver=usf", f"solver.solver_schedule={path}"))):
        rc = tiny_run(*extra)
        teacher = build_teacher(rc.teacher)
        fp = expected_fingerprint(rc, teacher, state_shape(teacher))
        v1 = {("sample_shape" if k == "state_shape" else k): v for k, v in fp.items()}    # format_version 1's names
        v1["solver"] = {("schedule_sha256" if k == "solver_schedule_sha256" else k): v for k, v in fp["solver"].items()}
        digests[name] = hashlib.sha256(json.dumps(v1).encode()).hexdigest()
        old = {"format_version": 1, "fingerprint": v1, "seed": 0, "num_trajectories": 1, "shard_size": 1, "shards": []}
        check_fingerprint(Manifest.from_dict(old), fp)          # such a data set's manifest reads as this one
    assert fp["solver"]["solver_schedule_sha256"] == "b501184099895c44"
    assert digests == {"default": "4005cdeb4627aee9ecd0f92ecbcdfc8a3865e62efec15bc59347046a8ab5e15e",
                       "usf": "adf9243fe8282426f0583eaa1fe37034559534458a0b71e89f21251ffcc2bf29"}


@pytest.fixture
def own_grid_solver():
    """A solver registered for the test that carries its own grid, fingerprint entry and run check."""
    from dsno.solvers import registry
    from dsno.solvers.registry import OptionError, register
    ts = [1.0, 0.8, 0.5625, 0.25, 0.0625, 0.001]

    def check(options, order, t_end, times):
        if options["scale"] != 1.0:
            raise OptionError("options.scale", options["scale"], "must be 1.0 for this run")

    def own_grid(teacher, x, ts, *, order=1, return_trajectory=False, scale=1.0):
        return dsno.solve(teacher, x * scale, ts, solver="euler", return_trajectory=return_trajectory)

    register("own_grid", orders=(1,), cost=lambda steps, order, options: steps, cost_rule="1 per step",
             grid=lambda options: ts, fingerprint=lambda options: {"grid_id": f"six-{options['scale']}"},
             check=check)(own_grid)
    yield ts
    registry._REGISTRY.pop("own_grid")


def test_the_stages_use_a_solvers_own_grid_fingerprint_and_checks(tiny_run, own_grid_solver):
    """No stage knows a solver by name: what usf does through the registry, any solver can."""
    from dsno.builders import build_teacher, solver_grid
    from dsno.config import ConfigError
    from dsno.stages.trajectories import make_solve, solver_spec
    rc = tiny_run("solver.name=own_grid", "solver.order=1")
    teacher = build_teacher(rc.teacher)
    times = [float(t) for t in rc.data.times]
    grid = solver_grid(teacher, rc.solver, times)
    assert grid.tolist() == own_grid_solver
    assert solver_spec(rc.solver) == {"name": "own_grid", "order": 1, "steps": 12, "spacing": "logsnr",
                                      "t_end": 0.001, "options": {}, "grid_id": "six-1.0"}
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    direct = dsno.solve(teacher, x.double(), torch.tensor(own_grid_solver, dtype=torch.float64), solver="euler",
                         return_trajectory=True)
    idx = [own_grid_solver.index(t) for t in times]
    assert torch.allclose(make_solve(teacher, rc.solver, grid, times)(x), direct[idx].transpose(0, 1).float())
    with pytest.raises(ConfigError, match=r"^config error: solver.options.scale=2.0: must be 1.0 for this run$"):
        tiny_run("solver.name=own_grid", "solver.order=1", "+solver.options.scale=2.0")
    with pytest.raises(ConfigError, match=r"solver.solver_schedule='x.yaml': applies to solver=usf only, not "
                       r"solver=own_grid"):
        tiny_run("solver.name=own_grid", "solver.order=1", "solver.solver_schedule=x.yaml")


def test_shape_mismatch_is_one_report():
    """Weights files, exported models and copied backbones report a mismatch in the same words."""
    from dsno.trust.tensor_file import shape_mismatch
    assert shape_mismatch({"a": (1,), "b": (2,)}, {"b": (3,), "c": (1,)}) == \
        "missing ['a'], unexpected ['c'], wrong shape ['b: (3,) vs (2,)']"
    assert shape_mismatch({"a": (1,)}, {"a": (1,)}) is None
