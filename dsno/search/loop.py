"""S^3: search the USF solver schedule that best fits one teacher at one NFE.

1. score a population (hand-designed solvers as solver schedules on every library spacing, then random
   draws) by the cheap metric: RMSE of the final state against the teacher's reference solution
   (a long float64 DPM-Solver++ 3M solve) on a small noise batch;
2. each round: train the performance predictor on everything scored, breed `proposals`
   children of the best `parents` (mutation, crossover, a few fresh draws), score the ones the
   predictor ranks best plus a random `explore` share (on which the predictor's Kendall tau is
   measured: they are held out from its training);
3. refine the best candidate's times by coordinate descent (`refine` sweeps, see `_refine`);
4. verify the `verify_top` best on a larger batch of other noise (the full metric) and write the
   winner to <out>/nfe<N>.yaml (timestep-only mode: nfe<N>_timesteps.yaml).

Everything scored is kept in <out>/<name>.scored.json (replaced atomically); a rerun resumes
from it and, every draw being seeded by (seed, round, index), ends where an uninterrupted run would.

A class-conditional teacher is searched on labelled noise under its guidance (`dsno.search.conditioning`):
the labels' rule and the guidance scale are part of the fingerprint a resume must match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from dsno.atomic import atomic_save_safetensors, atomic_write_text
from dsno.progress import progress_bar
from dsno.search.conditioning import Conditioning
from dsno.search.config import BASES, MODES, NOISE_SEED_STRIDE, SearchConfig, check_search  # noqa: F401
from dsno.search.predictor import Predictor, kendall_tau
from dsno.search.records import Scored, SearchError, SearchState
from dsno.search.space import BASE_OPTIONS, Space, _build, _tidy, crossover, encode, mutate, random_solver_schedule
from dsno.solvers import usf
from dsno.solvers.grids import SPACINGS, timesteps
from dsno.solvers.reference import REFERENCE_LABEL, reference_solve, rmse

log = logging.getLogger("dsno")
SEEDED = tuple((name, order, BASE_OPTIONS.get(name, {})) for name, order in (
    ("unipc", 3), ("dpm_solver_pp", 3), ("dpm_solver_pp", 2), ("deis", 3), ("ipndm", 3), ("ipndm", 4)))
MAX_RMSE = 1e3
RUN_ONLY = ("rounds", "refine", "verify_top", "resume", "out", "threads")   # search.* keys a resume may change
SAVE_EVERY = 25                   # initial candidates scored between saves of the scored file


def _key(s: usf.SolverSchedule) -> str:
    d = usf.to_dict(s)
    d["timesteps"] = [round(t, 10) for t in d["timesteps"]]
    return json.dumps(d, sort_keys=True)


def _score(teacher, s: usf.SolverSchedule, x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMSE of the solver schedule's final state against the reference; inf when not finite."""
    with torch.no_grad():
        v = rmse(usf.run(teacher, x, s), ref)
    return v if math.isfinite(v) else math.inf


def noise_seeds(seed: int) -> tuple[int, int]:
    """The generator seeds of a search's scoring noise and of its verification noise (search.seed=seed)."""
    return NOISE_SEED_STRIDE * seed + 1, NOISE_SEED_STRIDE * seed + 2


def reference(teacher, x: torch.Tensor, t_end: float, steps: int, cache: Path | None) -> torch.Tensor:
    """The teacher's reference solution from x at T to t_end (eval's: dsno.solvers.reference, `steps`
    logSNR steps), cached as safetensors under `cache` when given."""
    if cache is not None and cache.is_file():
        return load_file(str(cache))["x"]
    with torch.no_grad():
        ref = reference_solve(teacher, x, t_end, steps)
    if cache is not None:
        atomic_save_safetensors(cache, {"x": ref.contiguous()})
    return ref


# --- records of a run ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoiseBatch:
    """A batch the candidates are scored on: x_T [B, *shape] in the working dtype, its class labels [B]
    long (None: an unconditional teacher), the teacher every solve of the batch calls (bound to the
    labels and the guidance once), and the reference final state [B, *shape] float64."""

    x: torch.Tensor
    labels: torch.Tensor | None
    teacher: Any
    ref: torch.Tensor

    def score(self, s: usf.SolverSchedule) -> float:
        return _score(self.teacher, s, self.x, self.ref)


@dataclass(frozen=True)
class Winner:
    """The verified best candidate: its solver schedule, its RMSE on the verification and on the search batch."""

    solver_schedule: usf.SolverSchedule
    rmse_verify: float
    rmse_search: float


class CostMeter:
    """The cost of a search: wall and CPU seconds, teacher calls and the samples they evaluate (a hook
    on the teacher), added to what its state had spent before (a resume)."""

    def __init__(self, teacher: torch.nn.Module, state: SearchState):
        self.start = (time.perf_counter(), time.process_time())
        self.calls = self.samples = 0
        self.before = (state.wall_s, state.cpu_s, state.teacher_calls, state.teacher_samples)
        self.handle = teacher.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1
        self.samples += int(args[0].shape[0])

    def stamp(self, state: SearchState) -> None:
        """Write the cost so far into `state`."""
        wall, cpu, calls, samples = self.before
        state.wall_s = wall + time.perf_counter() - self.start[0]
        state.cpu_s = cpu + time.process_time() - self.start[1]
        state.teacher_calls, state.teacher_samples = calls + self.calls, samples + self.samples

    def close(self) -> None:
        self.handle.remove()


class Ledger:
    """A running search: its state, the file the state is saved to, the search batch the candidates
    are scored on, the cost meter and the progress bar's task."""

    def __init__(self, state: SearchState, path: Path, batch: NoiseBatch, meter: CostMeter, bar, task):
        self.state, self.path, self.batch, self.meter, self.bar, self.task = state, path, batch, meter, bar, task
        self.seen = {_key(r.candidate()): r.rmse for r in state.scored if not r.duplicate}

    def score(self, s: usf.SolverSchedule, rnd: int, predicted: float | None = None, explore: bool = False) -> Scored:
        """Score s on the search batch and record it."""
        row = Scored(usf.to_dict(s), self.batch.score(s), rnd, predicted, explore)
        self.state.scored.append(row)
        self.seen[_key(s)] = row.rmse
        return row

    def metric(self, s: usf.SolverSchedule, rnd: int) -> float:
        """The search-batch RMSE of s: from the record when it is there (a resumed refinement replays its
        moves), else scored now, recorded and saved."""
        k = _key(s)
        if k not in self.seen:
            self.score(s, rnd)
            self.save()
            self.advance()
        return self.seen[k]

    def save(self) -> None:
        self.meter.stamp(self.state)
        atomic_write_text(self.path, self.state.to_json())

    def advance(self) -> None:
        self.bar.advance(self.task)


# --- the recipe ------------------------------------------------------------------------------------

def search(teacher, nfe: int, sc: SearchConfig, out_dir: str | Path, t_end: float, dtype: torch.dtype,
           progress: bool = True, shape: tuple[int, ...] | None = None,
           class_weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Run (or resume) the search; write <out_dir>/<name>.yaml; return a summary dict.
    dtype: the working dtype of the candidates' solves; shape: one sample's [C, H, W] (default
    teacher.shape); class_weights: a class-conditional teacher's label weights (None: its own, else
    uniform), see `dsno.search.conditioning`."""
    check_search(sc, nfe, float(teacher.schedule.T), t_end)
    space = search_space(teacher, nfe, sc, t_end)
    conditioning = Conditioning.of(teacher, class_weights)
    name = f"nfe{nfe}" + ("_timesteps" if sc.mode == "timesteps" else "")
    out_dir = Path(out_dir)
    scored_path, yaml_path = out_dir / f"{name}.scored.json", out_dir / f"{name}.yaml"
    fp = fingerprint(teacher, nfe, sc, t_end, dtype, conditioning)
    state = SearchState.load(scored_path, fp, sc.resume)
    meter = CostMeter(teacher, state)
    try:
        batch, verify = noise_batches(teacher, sc, tuple(shape or teacher.shape), dtype, t_end, conditioning,
                                      out_dir / ".reference")
        winner, info = _run(space, sc, state, scored_path, batch, verify, meter, progress, conditioning)
    finally:
        meter.close()
    return write_winner(winner, info, yaml_path, sc.verify_batch)


def search_space(teacher, nfe: int, sc: SearchConfig, t_end: float) -> Space:
    """The candidates of the search; SearchError when search.afs holds only `mean` and the teacher has none."""
    afs = tuple(a for a in sc.afs if a != "mean" or _has_mean(teacher))
    if not afs:
        raise SearchError("config error: search.afs=[mean]: this teacher has no data mean; add none or zero")
    return Space(schedule=teacher.schedule, nfe=nfe, t_start=float(teacher.schedule.T), t_end=float(t_end),
                 pins=tuple(sorted((float(t) for t in sc.pin_times), reverse=True)), mode=sc.mode, base=sc.base,
                 base_order=sc.base_order, afs=afs)


def fingerprint(teacher, nfe: int, sc: SearchConfig, t_end: float, dtype: torch.dtype,
                conditioning: Conditioning | None) -> dict[str, Any]:
    """What a scored file must match to be resumed: the teacher, budget, end time, dtype, every
    search.* key but those of RUN_ONLY, and a conditional teacher's label rule and guidance."""
    fp = {"teacher": _teacher_id(teacher), "nfe": nfe, "t_end": float(t_end), "dtype": str(dtype),
          **{k: v for k, v in asdict(sc).items() if k not in RUN_ONLY}}
    return fp if conditioning is None else {**fp, **conditioning.fingerprint()}


def noise_batches(teacher, sc: SearchConfig, shape: tuple[int, ...], dtype: torch.dtype, t_end: float,
                  conditioning: Conditioning | None, cache: Path) -> tuple[NoiseBatch, NoiseBatch]:
    """The search batch (search.batch samples) and the verification batch (search.verify_batch) of
    search.seed, with their references (cached in `cache` under a tag of what they depend on)."""
    key = [_teacher_id(teacher), sc.seed, sc.batch, sc.verify_batch, sc.reference_steps, float(t_end)]
    if conditioning is not None:
        key.append(conditioning.fingerprint())
    tag = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    (search_seed, verify_seed), steps = noise_seeds(sc.seed), sc.reference_steps
    return (noise_batch(teacher, search_seed, sc.batch, shape, dtype, conditioning, t_end, steps,
                        cache / f"{tag}-search.safetensors"),
            noise_batch(teacher, verify_seed, sc.verify_batch, shape, dtype, conditioning, t_end, steps,
                        cache / f"{tag}-verify.safetensors"))


def noise_batch(teacher, seed: int, size: int, shape: tuple[int, ...], dtype: torch.dtype,
                conditioning: Conditioning | None, t_end: float, steps: int, cache: Path | None) -> NoiseBatch:
    """`size` samples of generator seed `seed` (labelled from the same seed for a conditional teacher)
    and their reference solve (`reference`) on the teacher bound to those labels."""
    x = torch.randn(size, *shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    labels = None if conditioning is None else conditioning.labels(seed, size)
    bound = teacher if conditioning is None else conditioning.bind(teacher, labels)
    return NoiseBatch(x, labels, bound, reference(bound, x, t_end, steps, cache))


def _run(space: Space, sc: SearchConfig, state: SearchState, scored_path: Path, batch: NoiseBatch,
         verify: NoiseBatch, meter: CostMeter, progress: bool,
         conditioning: Conditioning | None) -> tuple[Winner, dict[str, Any]]:
    """Score the population, run the rounds, refine, verify; the winner and the summary."""
    seeds = seeded_solver_schedules(space)
    n_initial = len(seeds) + sc.initial
    total = n_initial + sc.rounds * sc.scored_per_round + sc.verify_top + 2 * sc.refine * space.nfe
    with progress_bar(progress) as bar:
        task = bar.add_task(f"search nfe={space.nfe} best -", total=total)
        bar.update(task, completed=min(len(state.scored), n_initial) + state.rounds_done * sc.scored_per_round)
        ledger = Ledger(state, scored_path, batch, meter, bar, task)
        score_population(space, sc, ledger, seeds)
        for rnd in range(state.rounds_done + 1, sc.rounds + 1):
            search_round(space, sc, ledger, rnd, n_initial)
        if sc.refine:          # from the rounds' best, also when a resume finds refined candidates
            _refine(space, sc, state.ranked(last_round=sc.rounds)[0], ledger.metric, sc.rounds + 1)
        winner = verify_best(sc, ledger, verify)
    ledger.save()
    return winner, summary(space, sc, state, winner, conditioning)


def score_population(space: Space, sc: SearchConfig, ledger: Ledger, seeds: list[usf.SolverSchedule]) -> None:
    """Step 1: the seeds, then search.initial random draws (draw i seeded by (seed, 0, i)); a draw already
    scored gets a duplicate row. Resumes after the last round-0 row; saved every SAVE_EVERY and at the end."""
    done = sum(1 for r in ledger.state.scored if r.round == 0)
    for idx in range(done, len(seeds) + sc.initial):
        s = seeds[idx] if idx < len(seeds) else random_solver_schedule(space, np.random.default_rng([sc.seed, 0, idx]))
        if _key(s) not in ledger.seen:
            ledger.score(s, 0)
        else:
            ledger.state.scored.append(Scored(usf.to_dict(s), None, 0, duplicate=True))
        ledger.advance()
        if (idx + 1) % SAVE_EVERY == 0:
            ledger.save()
    ledger.save()


def search_round(space: Space, sc: SearchConfig, ledger: Ledger, rnd: int, n_initial: int) -> None:
    """Step 2, round `rnd`: breed and score (`_round`), then record the round as done and save."""
    state = ledger.state
    _round(space, sc, ledger, rnd)
    state.rounds_done = rnd
    ledger.save()
    best = state.ranked()[0].rmse
    ledger.bar.update(ledger.task, completed=n_initial + rnd * sc.scored_per_round,
                      description=f"search nfe={space.nfe} best {best:.4g}")
    log.info("search round %d: best RMSE %.4g, predictor Kendall tau %.3f", rnd, best, state.taus[-1])


def verify_best(sc: SearchConfig, ledger: Ledger, verify: NoiseBatch) -> Winner:
    """Step 4: re-score the search.verify_top best on the verification batch; the best there (first on ties)."""
    verified = []
    for r in ledger.state.ranked()[: sc.verify_top]:
        s = r.candidate()
        verified.append(Winner(s, verify.score(s), r.rmse))
        ledger.advance()
    return min(verified, key=lambda w: w.rmse_verify)


def summary(space: Space, sc: SearchConfig, state: SearchState, winner: Winner,
            conditioning: Conditioning | None) -> dict[str, Any]:
    """The winner's `info`: its scores, the search's cost, and how it was searched (a conditional teacher:
    under which guidance scale, on labels of which class weights)."""
    taus = state.taus
    return {"score": {"rmse_verify": winner.rmse_verify, "rmse_search": winner.rmse_search,
                      "metric": "RMSE of the final state vs the float64 reference", "batch": sc.batch,
                      "verify_batch": sc.verify_batch,
                      "reference": f"{REFERENCE_LABEL}, {sc.reference_steps} logsnr steps, float64"},
            "cost": {"wall_s": round(state.wall_s, 2), "cpu_s": round(state.cpu_s, 2),
                     "teacher_calls": state.teacher_calls,
                     "teacher_sample_evals": state.teacher_samples, "candidates_scored": len(state.ranked()),
                     "candidates_ranked_by_predictor": state.rounds_done * sc.proposals,
                     "predictor_kendall_tau": round(float(np.mean(taus)), 4) if taus else None},
            "search": {"mode": sc.mode, "nfe": space.nfe, "seed": sc.seed, "rounds": state.rounds_done,
                       "refine": sc.refine,
                       **({"base": f"{sc.base}-{sc.base_order}"} if sc.mode == "timesteps" else {}),
                       **({"pin_times": list(space.pins)} if space.pins else {}),
                       **(conditioning.describe() if conditioning is not None else {})}}


def write_winner(winner: Winner, info: dict[str, Any], path: Path, verify_batch: int) -> dict[str, Any]:
    """Step 5: save the winner with its info to `path`; the summary dict `search` returns."""
    best = winner.solver_schedule
    solver_schedule = usf.SolverSchedule(ts=best.ts, steps=best.steps, afs=best.afs, info=info).declared()
    usf.save(solver_schedule, path)
    log.info("search: wrote %s (RMSE %.4g on %d verify samples)", path, info["score"]["rmse_verify"], verify_batch)
    return {"path": str(path), "solver_schedule": solver_schedule, **info}


def _teacher_id(teacher) -> Any:
    return teacher.fingerprint() if hasattr(teacher, "fingerprint") else type(teacher).__name__


def _has_mean(teacher) -> bool:
    try:
        usf.data_mean(teacher)
        return True
    except usf.SolverScheduleError:
        return False


# --- the steps' mathematics ------------------------------------------------------------------------

def seeded_solver_schedules(space: Space) -> list[usf.SolverSchedule]:
    """The hand-designed solvers of the space on every library spacing (and, in full mode, with
    each allowed analytic first step on one more step)."""
    out = []
    bases = [(space.base, space.base_order, BASE_OPTIONS.get(space.base, {}))] if space.mode == "timesteps" else SEEDED
    for spacing in SPACINGS:
        for name, order, opts in bases:
            for afs in (("none",) if space.mode == "timesteps" else space.afs):
                steps = space.nfe + (afs != "none")
                if steps - 1 < len(space.pins):
                    continue
                u = space.u_of_t(timesteps(space.schedule, steps=steps - len(space.pins), spacing=spacing,
                                           t_start=space.t_start, t_end=space.t_end).tolist())[1:-1]
                u = _tidy(np.concatenate([u, space.pin_u]), space)
                ts = space.t_of_u(np.concatenate([[0.0], u, [1.0]]))
                for pin in space.pins:
                    ts[int(np.argmin(np.abs(np.asarray(ts) - pin)))] = pin
                s = usf.from_solver(name, ts, order, **dict(opts))
                out.append(usf.SolverSchedule(ts=s.ts, steps=s.steps, afs=afs).declared())
    return out


def _refine(space: Space, sc: SearchConfig, best: Scored, metric: Callable[[usf.SolverSchedule, int], float],
            rnd: int) -> None:
    """Coordinate descent on the free interior times of the best candidate (GITS / LD3-like, its
    other decisions kept): sweep k = 0..refine-1 moves each time by 0.2 / 2^k of the gap towards
    either neighbour (in u, so a move adapts to the local step) and keeps a move that lowers the
    cheap metric. At most 2 * refine * nfe candidates; deterministic, so a resume replays it."""
    s, score = best.candidate(), best.rmse
    u = list(space.u_of_t(s.ts)[1:-1])
    pins = set(np.round(space.pin_u, 12).tolist())
    for sweep in range(sc.refine):
        frac = 0.2 / 2**sweep
        for j in range(len(u)):
            if round(u[j], 12) in pins:
                continue
            for side in (1, -1):
                edges = [0.0, *u, 1.0]
                moved = list(u)
                moved[j] = u[j] + frac * (edges[j + 1 + side] - u[j])
                c = _build(space, _tidy(np.asarray(moved), space), s.steps, s.afs)
                r = metric(c, rnd)
                if r < score:
                    s, score, u = c, r, list(space.u_of_t(c.ts)[1:-1])
                    break


def _round(space: Space, sc: SearchConfig, ledger: Ledger, rnd: int) -> None:
    """One round: fit the predictor on everything scored, breed proposals, score the predicted best plus
    a random (explore) share, and record the predictor's Kendall tau on that held-out share."""
    rng = np.random.default_rng([sc.seed, rnd])
    ranked = ledger.state.ranked()
    feats = np.stack([encode(space, r.candidate()) for r in ranked])
    target = np.log(np.minimum([r.rmse for r in ranked], MAX_RMSE))
    predictor = Predictor(seed=sc.seed * 1000 + rnd).fit(feats, target)
    proposals = _breed(space, sc, [r.candidate() for r in ranked[: sc.parents]], ledger.seen, rng)
    if not proposals:
        ledger.state.taus.append(0.0)
        return
    pred = predictor.predict(np.stack([encode(space, c) for c in proposals]))
    order = np.argsort(pred, kind="stable")
    n = min(sc.scored_per_round, len(proposals))
    n_explore = min(int(round(sc.explore * n)), len(proposals) - (n - int(round(sc.explore * n))))
    exploit = order[: n - n_explore]
    rest = order[n - n_explore:]
    explore = rng.choice(rest, size=n_explore, replace=False) if n_explore else np.array([], dtype=int)
    for i in exploit:
        ledger.score(proposals[i], rnd, float(pred[i]))
    held = [ledger.score(proposals[i], rnd, float(pred[i]), True) for i in explore]
    tau = kendall_tau([r.predicted for r in held], [math.log(min(r.rmse, MAX_RMSE)) for r in held]) \
        if len(held) >= 3 else 0.0
    ledger.state.taus.append(tau)


def _breed(space: Space, sc: SearchConfig, parents: list[usf.SolverSchedule], seen: dict[str, Any],
           rng: np.random.Generator) -> list[usf.SolverSchedule]:
    """Up to search.proposals new children (not in `seen`, no two alike) in at most 5x as many tries:
    10% fresh draws, 45% crossovers of two parents (half of them mutated), 45% mutated parents."""
    proposals, keys = [], set()
    for _ in range(5 * sc.proposals):
        if len(proposals) >= sc.proposals:
            break
        p = rng.random()
        if p < 0.1:
            c = random_solver_schedule(space, rng)
        else:
            a = parents[rng.integers(len(parents))]
            if p < 0.55:
                c = crossover(space, a, parents[rng.integers(len(parents))], rng)
                c = mutate(space, c, rng) if rng.random() < 0.5 else c
            else:
                c = mutate(space, a, rng)
        k = _key(c)
        if k not in seen and k not in keys:
            keys.add(k)
            proposals.append(c)
    return proposals
