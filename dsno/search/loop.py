"""S^3: search the USF schedule that best fits one teacher at one NFE.

1. score a population (hand-designed solvers as schedules on every library spacing, then random
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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dsno.atomic import atomic_save_safetensors, atomic_write_text
from dsno.errors import UserError
from dsno.jsonfile import read_json_file
from dsno.progress import progress_bar
from dsno.search.config import BASES, MODES, NOISE_SEED_STRIDE, SearchConfig, check_search  # noqa: F401
from dsno.search.predictor import Predictor, kendall_tau
from dsno.search.space import BASE_OPTIONS, Space, _build, _tidy, crossover, encode, mutate, random_schedule
from dsno.solvers import usf
from dsno.solvers.reference import REFERENCE_LABEL, reference_solve, rmse
from dsno.solvers.grids import SPACINGS, timesteps

log = logging.getLogger("dsno")
SEEDED = tuple((name, order, BASE_OPTIONS.get(name, {})) for name, order in (
    ("unipc", 3), ("dpm_solver_pp", 3), ("dpm_solver_pp", 2), ("deis", 3), ("ipndm", 3), ("ipndm", 4)))
MAX_RMSE = 1e3


class SearchError(UserError):
    """A search cannot run as configured (or cannot resume); the message names the key or file."""


def _key(s: usf.Schedule) -> str:
    d = usf.to_dict(s)
    d["timesteps"] = [round(t, 10) for t in d["timesteps"]]
    return json.dumps(d, sort_keys=True)


class _Counter:
    """Counts the teacher's model calls and the samples they evaluate."""

    def __init__(self, teacher: torch.nn.Module):
        self.calls = self.samples = 0
        self.handle = teacher.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1
        self.samples += int(args[0].shape[0])


def _score(teacher, s: usf.Schedule, x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMSE of the schedule's final state against the reference; inf when not finite."""
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
        from safetensors.torch import load_file
        return load_file(str(cache))["x"]
    with torch.no_grad():
        ref = reference_solve(teacher, x, t_end, steps)
    if cache is not None:
        atomic_save_safetensors(cache, {"x": ref.contiguous()})
    return ref


def seeded_schedules(space: Space) -> list[usf.Schedule]:
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
                out.append(usf.Schedule(ts=s.ts, steps=s.steps, afs=afs).declared())
    return out


def search(teacher, nfe: int, sc: SearchConfig, out_dir: str | Path, t_end: float, dtype: torch.dtype,
           progress: bool = True, shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Run (or resume) the search; write <out_dir>/<name>.yaml; return a summary dict.
    dtype: the working dtype of the candidates' solves; shape: one sample's [C, H, W] (default
    teacher.shape)."""
    t_start = float(teacher.schedule.T)
    check_search(sc, nfe, t_start, t_end)
    afs = tuple(a for a in sc.afs if a != "mean" or _has_mean(teacher))
    if not afs:
        raise SearchError("config error: search.afs=[mean]: this teacher has no data mean; add none or zero")
    space = Space(schedule=teacher.schedule, nfe=nfe, t_start=t_start, t_end=float(t_end),
                  pins=tuple(sorted((float(t) for t in sc.pin_times), reverse=True)), mode=sc.mode, base=sc.base,
                  base_order=sc.base_order, afs=afs)
    name = f"nfe{nfe}" + ("_timesteps" if sc.mode == "timesteps" else "")
    out_dir = Path(out_dir)
    scored_path, yaml_path = out_dir / f"{name}.scored.json", out_dir / f"{name}.yaml"
    fp = {"teacher": teacher.fingerprint() if hasattr(teacher, "fingerprint") else type(teacher).__name__,
          "nfe": nfe, "t_end": float(t_end), "dtype": str(dtype),
          **{k: v for k, v in asdict(sc).items() if k not in ("rounds", "refine", "verify_top", "resume", "out", "threads")}}
    state = _load_state(scored_path, fp, sc.resume)
    t0, counter = (time.perf_counter(), time.process_time()), _Counter(teacher)
    try:
        shape = tuple(shape or teacher.shape)
        score_seed, verify_seed = noise_seeds(sc.seed)
        x_s = torch.randn(sc.batch, *shape, generator=torch.Generator().manual_seed(score_seed)).to(dtype)
        x_v = torch.randn(sc.verify_batch, *shape, generator=torch.Generator().manual_seed(verify_seed)).to(dtype)
        tag = hashlib.sha256(json.dumps([fp["teacher"], sc.seed, sc.batch, sc.verify_batch, sc.reference_steps,
                                         float(t_end)], sort_keys=True, default=str).encode()).hexdigest()[:12]
        cache = out_dir / ".reference"
        ref_s = reference(teacher, x_s, t_end, sc.reference_steps, cache / f"{tag}-search.safetensors")
        ref_v = reference(teacher, x_v, t_end, sc.reference_steps, cache / f"{tag}-verify.safetensors")
        result = _run(teacher, space, sc, state, scored_path, x_s, ref_s, x_v, ref_v, progress, t0, counter)
    finally:
        counter.handle.remove()
    best, info = result
    sched = usf.Schedule(ts=best.ts, steps=best.steps, afs=best.afs, info=info).declared()
    usf.save(sched, yaml_path)
    log.info("search: wrote %s (RMSE %.4g on %d verify samples)", yaml_path, info["score"]["rmse_verify"],
             sc.verify_batch)
    return {"path": str(yaml_path), "schedule": sched, **info}


def _has_mean(teacher) -> bool:
    try:
        usf.data_mean(teacher)
        return True
    except usf.ScheduleError:
        return False


def _load_state(path: Path, fp: dict, resume: bool) -> dict:
    fresh = {"version": 1, "fingerprint": fp, "scored": [], "rounds_done": 0, "taus": [], "wall_s": 0.0, "cpu_s": 0.0,
             "teacher_calls": 0, "teacher_samples": 0}
    if not path.is_file() or not resume:
        return fresh
    state = read_json_file(path, SearchError, "it is the search's scored-candidates file: delete it or set "
                                              "search.resume=false", expect=dict)
    old = state.get("fingerprint", {})
    diff = sorted(k for k in set(old) | set(fp) if json.dumps(old.get(k), sort_keys=True, default=str)
                  != json.dumps(fp.get(k), sort_keys=True, default=str))
    if diff:
        raise SearchError(f"scored-candidates file {path} belongs to another search ({diff[0]} differs); delete it, "
                          f"set search.resume=false, or search.out=ANOTHER_DIR")
    return state


def _run(teacher, space: Space, sc: SearchConfig, state: dict, scored_path: Path, x_s, ref_s, x_v, ref_v,
         progress: bool, t0: tuple[float, float], counter: _Counter):
    seen = {_key(usf.from_dict(r["schedule"])): r["rmse"] for r in state["scored"] if not r.get("duplicate")}
    calls0, samples0, wall0 = state["teacher_calls"], state["teacher_samples"], state["wall_s"]
    cpu0 = state.get("cpu_s", 0.0)

    def save() -> None:
        state["wall_s"] = wall0 + time.perf_counter() - t0[0]
        state["cpu_s"] = cpu0 + time.process_time() - t0[1]
        state["teacher_calls"], state["teacher_samples"] = calls0 + counter.calls, samples0 + counter.samples
        atomic_write_text(scored_path, json.dumps(state))

    def add(s: usf.Schedule, rnd: int, predicted: float | None = None, explore: bool = False) -> None:
        state["scored"].append({"schedule": usf.to_dict(s), "rmse": _score(teacher, s, x_s, ref_s), "round": rnd,
                                "predicted": predicted, "explore": explore})
        seen[_key(s)] = state["scored"][-1]["rmse"]

    def cheap_metric(s: usf.Schedule, rnd: int) -> float:
        """The search-batch RMSE of s: from the scored file when it is there (a resumed refinement
        replays its moves), else scored now and kept."""
        k = _key(s)
        if k not in seen:
            add(s, rnd)
            save()
            bar.advance(task)
        return seen[k]

    seeds = seeded_schedules(space)
    total_initial = len(seeds) + sc.initial
    total = total_initial + sc.rounds * sc.scored_per_round + sc.verify_top + 2 * sc.refine * space.nfe
    with progress_bar(progress) as bar:
        task = bar.add_task(f"search nfe={space.nfe} best -", total=total)
        done = min(len(state["scored"]), total_initial) + state["rounds_done"] * sc.scored_per_round
        bar.update(task, completed=done)
        n_initial = sum(1 for r in state["scored"] if r["round"] == 0)
        for idx in range(n_initial, total_initial):
            s = seeds[idx] if idx < len(seeds) else random_schedule(space, np.random.default_rng([sc.seed, 0, idx]))
            if _key(s) not in seen:
                add(s, 0)
            else:
                state["scored"].append({"schedule": usf.to_dict(s), "rmse": None, "round": 0, "duplicate": True})
            bar.advance(task)
            if (idx + 1) % 25 == 0:
                save()
        save()
        for rnd in range(state["rounds_done"] + 1, sc.rounds + 1):
            _round(space, sc, state, rnd, add, seen)
            state["rounds_done"] = rnd
            save()
            best = _ranked(state)[0]["rmse"]
            bar.update(task, completed=total_initial + rnd * sc.scored_per_round,
                       description=f"search nfe={space.nfe} best {best:.4g}")
            log.info("search round %d: best RMSE %.4g, predictor Kendall tau %.3f", rnd, best, state["taus"][-1])
        if sc.refine:
            _refine(space, sc, _ranked(state)[0], cheap_metric, sc.rounds + 1)
        ranked = _ranked(state)
        top = ranked[: sc.verify_top]
        verified = []
        for r in top:
            s = usf.from_dict(r["schedule"])
            verified.append((_score(teacher, s, x_v, ref_v), r["rmse"], s))
            bar.advance(task)
    v, r_s, best = min(verified, key=lambda t: t[0])
    save()
    taus = state["taus"]
    info = {"score": {"rmse_verify": v, "rmse_search": r_s, "metric": "RMSE of the final state vs the float64 "
                      "reference", "batch": sc.batch, "verify_batch": sc.verify_batch,
                      "reference": f"{REFERENCE_LABEL}, {sc.reference_steps} logsnr steps, float64"},
            "cost": {"wall_s": round(state["wall_s"], 2), "cpu_s": round(state["cpu_s"], 2),
                     "teacher_calls": state["teacher_calls"],
                     "teacher_sample_evals": state["teacher_samples"], "candidates_scored": len(ranked),
                     "candidates_ranked_by_predictor": state["rounds_done"] * sc.proposals,
                     "predictor_kendall_tau": round(float(np.mean(taus)), 4) if taus else None},
            "search": {"mode": sc.mode, "nfe": space.nfe, "seed": sc.seed, "rounds": state["rounds_done"],
                       "refine": sc.refine,
                       **({"base": f"{sc.base}-{sc.base_order}"} if sc.mode == "timesteps" else {}),
                       **({"pin_times": list(space.pins)} if space.pins else {})}}
    return best, info


def _refine(space: Space, sc: SearchConfig, best: dict, metric: Callable, rnd: int) -> None:
    """Coordinate descent on the free interior times of the best candidate (GITS / LD3-like, its
    other decisions kept): sweep k = 0..refine-1 moves each time by 0.2 / 2^k of the gap towards
    either neighbour (in u, so a move adapts to the local step) and keeps a move that lowers the
    cheap metric. At most 2 * refine * nfe candidates; deterministic, so a resume replays it."""
    s, score = usf.from_dict(best["schedule"]), best["rmse"]
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


def _ranked(state: dict) -> list[dict]:
    return sorted((r for r in state["scored"] if not r.get("duplicate")), key=lambda r: r["rmse"])


def _round(space: Space, sc: SearchConfig, state: dict, rnd: int, add: Callable, seen: dict) -> None:
    """One round: fit the predictor, breed proposals, score the predicted best plus a random share."""
    rng = np.random.default_rng([sc.seed, rnd])
    ranked = _ranked(state)
    parents = [usf.from_dict(r["schedule"]) for r in ranked[: sc.parents]]
    feats = np.stack([encode(space, usf.from_dict(r["schedule"])) for r in ranked])
    target = np.log(np.minimum([r["rmse"] for r in ranked], MAX_RMSE))
    predictor = Predictor(seed=sc.seed * 1000 + rnd).fit(feats, target)
    proposals, keys = [], set()
    for _ in range(5 * sc.proposals):
        if len(proposals) >= sc.proposals:
            break
        p = rng.random()
        if p < 0.1:
            c = random_schedule(space, rng)
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
    if not proposals:
        state["taus"].append(0.0)
        return
    pred = predictor.predict(np.stack([encode(space, c) for c in proposals]))
    order = np.argsort(pred, kind="stable")
    n = min(sc.scored_per_round, len(proposals))
    n_explore = min(int(round(sc.explore * n)), len(proposals) - (n - int(round(sc.explore * n))))
    exploit = order[: n - n_explore]
    rest = order[n - n_explore:]
    explore = rng.choice(rest, size=n_explore, replace=False) if n_explore else np.array([], dtype=int)
    for i in exploit:
        add(proposals[i], rnd, float(pred[i]))
    for i in explore:
        add(proposals[i], rnd, float(pred[i]), True)
    held = state["scored"][-n_explore:] if n_explore else []
    tau = kendall_tau([r["predicted"] for r in held], [math.log(min(r["rmse"], MAX_RMSE)) for r in held]) \
        if len(held) >= 3 else 0.0
    state["taus"].append(tau)
