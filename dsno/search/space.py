"""The search space of USF solver schedules at one NFE: random draws, mutation, crossover, repair, and a
fixed-length encoding for the performance predictor.

Times are handled as u in (0, 1): the position of lambda between lambda(ts[0]) and lambda(t_end)
(u uniform = the logSNR grid). Pinned times (e.g. DSNO's output times) never move. The draw
follows the public USF code's priors (order {1: .2, 2: .4, 3: .3, 4: .1}, small relaxations,
pseudo-correctors common, analytic first steps common).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from dsno.solvers.grids import SPACINGS, timesteps
from dsno.solvers.usf import AFS, SolverSchedule, Step, from_solver, validate

ORDER_PRIOR = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}
MIN_GAP = 1e-3
STEP_FEATURES = 17
BASE_OPTIONS = {"deis": {"variant": "logrho"}}      # the options that make a base solver a USF solver schedule
RELAX_PRIOR = {"bh1": 0.1, "bh2": 0.2, "adams": 0.15, "linear": 0.55}


@dataclass(frozen=True)
class Space:
    """What a search may vary. schedule: the teacher's VP (noise) schedule; nfe: the budget; t_start,
    t_end: the fixed ends; pins: times every grid passes through; mode: "full" (every decision)
    or "timesteps" (only the interior times of `base`-`base_order`, GITS / LD3-style); afs: the
    analytic first steps allowed."""

    schedule: object
    nfe: int
    t_start: float
    t_end: float
    pins: tuple[float, ...] = ()
    mode: str = "full"
    base: str = "unipc"
    base_order: int = 3
    afs: tuple[str, ...] = AFS

    @property
    def lam_bounds(self) -> tuple[float, float]:
        lam = self.schedule.lam(torch.tensor([self.t_start, self.t_end], dtype=torch.float64)).tolist()
        return lam[0], lam[1]

    def u_of_t(self, ts: Sequence[float]) -> np.ndarray:
        a, b = self.lam_bounds
        return (self.schedule.lam(torch.tensor(list(ts), dtype=torch.float64)).numpy() - a) / (b - a)

    def t_of_u(self, u: Sequence[float]) -> list[float]:
        a, b = self.lam_bounds
        t = self.schedule.t_of_lam(torch.tensor(a + np.asarray(u) * (b - a), dtype=torch.float64)).tolist()
        t[0], t[-1] = self.t_start, self.t_end
        return t

    @property
    def pin_u(self) -> np.ndarray:
        return self.u_of_t(self.pins) if self.pins else np.zeros(0)


def _grid_u(space: Space, rng: np.random.Generator, steps: int) -> np.ndarray:
    """Interior u's of a random grid of `steps` steps through the pins: a library spacing, warped
    by u -> u^p and jittered."""
    free = steps - len(space.pins)
    spacing = SPACINGS[rng.integers(len(SPACINGS))]
    base = space.u_of_t(timesteps(space.schedule, steps=free, spacing=spacing, t_start=space.t_start,
                                  t_end=space.t_end).tolist())[1:-1]
    base = np.clip(base, MIN_GAP, 1 - MIN_GAP) ** math.exp(rng.normal(0.0, 0.3))
    base = base + rng.normal(0.0, rng.choice([0.0, 0.02, 0.05]), size=base.shape)
    return _tidy(np.concatenate([np.clip(base, MIN_GAP, 1 - MIN_GAP), space.pin_u]), space)


def _tidy(u: np.ndarray, space: Space) -> np.ndarray:
    """Sorted interior u's, at least MIN_GAP apart and from the ends (free ones pushed apart,
    pins kept exactly); the count is kept."""
    u = np.sort(np.clip(np.asarray(u, dtype=np.float64), MIN_GAP, 1 - MIN_GAP))
    pinned = np.isin(np.round(u, 12), np.round(space.pin_u, 12))
    for j in range(len(u)):
        if not pinned[j]:
            u[j] = max(u[j], (u[j - 1] if j else 0.0) + MIN_GAP)
    for j in reversed(range(len(u))):
        if not pinned[j]:
            u[j] = min(u[j], (u[j + 1] if j + 1 < len(u) else 1.0) - MIN_GAP)
    return u


def _random_step(rng: np.random.Generator, i: int, last: bool) -> Step:
    orders, probs = zip(*ORDER_PRIOR.items())
    k = min(int(rng.choice(orders, p=probs)), i + 1)
    est = k - 1
    if est < min(i, 3) and rng.random() < 0.15:
        est += 1
    points = list(range(1, est + 1))
    if points and points[-1] < i and rng.random() < 0.15:
        points.append(points[-1] + 1)
    names, probs = zip(*RELAX_PRIOR.items())
    relax = str(rng.choice(names, p=probs))
    coef = float(rng.normal(0.0, 0.15)) if relax == "linear" and rng.random() < 0.5 else 0.0
    if relax == "adams":
        est, points = k - 1, list(range(1, k))
    return Step(prediction="data" if rng.random() < 0.6 else "noise", order=k, points=tuple(points), est_order=est,
                relax=relax, coef=coef, corrector="pseudo" if (not last and rng.random() < 0.5) else "none")


def _build(space: Space, u: np.ndarray, steps: Sequence[Step], afs: str) -> SolverSchedule:
    ts = space.t_of_u(np.concatenate([[0.0], u, [1.0]]))
    for pin in space.pins:                                   # exactly, not through the lambda round trip
        j = int(np.argmin(np.abs(np.asarray(ts) - pin)))
        ts[j] = pin
    ts = tuple(ts)
    if space.mode == "timesteps":
        return from_solver(space.base, ts, space.base_order, **BASE_OPTIONS.get(space.base, {}))
    return repair(SolverSchedule(ts=ts, steps=tuple(steps), afs=afs))


def random_solver_schedule(space: Space, rng: np.random.Generator) -> SolverSchedule:
    """A random valid solver schedule of the space."""
    if space.mode == "timesteps":
        return _build(space, _grid_u(space, rng, space.nfe), [], "none")
    afs = space.afs[rng.integers(len(space.afs))]
    steps = space.nfe + (afs != "none")
    u = _grid_u(space, rng, steps)
    n = len(u) + 1
    return _build(space, u, [_random_step(rng, i, i == n - 1) for i in range(n)], afs)


def repair(s: SolverSchedule) -> SolverSchedule:
    """The nearest valid solver schedule: orders and lags capped by the evaluations that exist, est_order
    in [order - 1, 3] (exactly order - 1 with as many lags for relax=adams), no corrector on the
    last step, coef 0 off relax=linear; nfe declared."""
    steps = []
    n = len(s.steps)
    for i, st in enumerate(s.steps):
        k = max(1, min(st.order, i + 1))
        est = max(k - 1, min(st.est_order, i, 3))
        points = [p for p in dict.fromkeys(st.points) if 1 <= p <= i]
        if len(points) < est:
            points = list(range(1, est + 1))
        if st.relax == "adams":
            est = k - 1
            points = points[:est] if len(points) >= est else list(range(1, est + 1))
        steps.append(replace(st, order=k, est_order=est, points=tuple(points),
                             coef=st.coef if st.relax == "linear" else 0.0,
                             corrector="none" if i == n - 1 else st.corrector))
    return validate(replace(s, steps=tuple(steps), nfe=None, info={}).declared())


def mutate(space: Space, s: SolverSchedule, rng: np.random.Generator) -> SolverSchedule:
    """A child of `s`: the public USF code's mutations (AFS toggle with a step added / dropped at
    p 0.2; per step p 0.3: time jitter sigma 0.03 in u, order, prediction, relaxation, estimation
    order, lags, corrector)."""
    u = list(space.u_of_t(s.ts)[1:-1])
    steps = list(s.steps)
    afs = s.afs
    pins = set(np.round(space.pin_u, 12).tolist())
    if space.mode == "full" and len(space.afs) > 1 and rng.random() < 0.2:
        new = space.afs[rng.integers(len(space.afs))]
        free = [j for j, v in enumerate(u) if round(v, 12) not in pins]
        if (new == "none") != (afs == "none"):
            if new == "none" and free:                       # one step fewer: drop a free time
                j = free[rng.integers(len(free))]
                del u[j]
                del steps[j + 1]
            elif new != "none":                              # one step more: split a step
                edges = [0.0, *u, 1.0]
                j = int(rng.integers(len(edges) - 1))
                u.insert(j, 0.5 * (edges[j] + edges[j + 1]))
                steps.insert(j + 1, steps[j])
            else:
                new = afs
        afs = new
    edges = [0.0, *u, 1.0]
    for j in range(len(u)):
        if round(u[j], 12) not in pins and rng.random() < 0.3:
            lo, hi = edges[j] + MIN_GAP, edges[j + 2] - MIN_GAP
            if lo < hi:
                u[j] = float(np.clip(u[j] + rng.normal(0.0, 0.03), lo, hi))
                edges[j + 1] = u[j]
    if space.mode == "full":
        for i in range(len(steps)):
            if rng.random() < 0.3:
                steps[i] = _mutate_step(steps[i], rng, i)
    return _build(space, _tidy(np.asarray(u), space), steps, afs)


def _mutate_step(st: Step, rng: np.random.Generator, i: int) -> Step:
    what = rng.integers(7)
    if what == 0:
        orders, probs = zip(*ORDER_PRIOR.items())
        k = int(rng.choice(orders, p=probs))
        return replace(st, order=k, est_order=max(st.est_order, k - 1), points=tuple(range(1, max(st.est_order, k - 1) + 1)))
    if what == 1:
        return replace(st, prediction="noise" if st.prediction == "data" else "data")
    if what == 2:
        return replace(st, relax="linear", coef=float(st.coef + rng.normal(0.0, 0.03)))
    if what == 3:
        return replace(st, relax=("bh1", "bh2", "adams", "linear")[rng.integers(4)], coef=0.0)
    if what == 4:
        est = int(np.clip(st.est_order + rng.choice([-1, 1]), st.order - 1, 3))
        return replace(st, est_order=est, points=tuple(range(1, est + 1)))
    if what == 5:
        pts = list(st.points)
        if pts and rng.random() < 0.5 and len(pts) > st.est_order:
            pts.pop()
        else:
            pts.append(max(pts, default=0) + 1)
        return replace(st, points=tuple(pts))
    return replace(st, corrector="none" if st.corrector == "pseudo" else "pseudo")


def crossover(space: Space, a: SolverSchedule, b: SolverSchedule, rng: np.random.Generator) -> SolverSchedule:
    """Whole times from one parent; per step decisions from either (parents of equal length)."""
    if len(a.steps) != len(b.steps):
        return a
    base = a if rng.random() < 0.5 else b
    steps = [x if rng.random() < 0.5 else y for x, y in zip(a.steps, b.steps)]
    return _build(space, space.u_of_t(base.ts)[1:-1], steps, base.afs)


def encode(space: Space, s: SolverSchedule) -> np.ndarray:
    """Fixed-length features [(nfe + 1) * STEP_FEATURES + 3] of a solver schedule (float32)."""
    slots = space.nfe + 1
    out = np.zeros((slots, STEP_FEATURES), dtype=np.float32)
    u = space.u_of_t(s.ts)
    for i, st in enumerate(s.steps):
        out[i, :3] = (1.0, u[i], u[i + 1] - u[i])
        out[i, 3] = st.prediction == "data"
        out[i, 4] = st.order / 4
        out[i, 4 + st.order] = 1.0
        out[i, 9] = st.est_order / 3
        out[i, 10] = len(st.points) / 4
        out[i, 11] = st.coef
        out[i, 12] = st.relax == "bh1"
        out[i, 13] = st.relax == "bh2"
        out[i, 14] = st.corrector == "pseudo"
        out[i, 15] = max(st.points, default=0) / 4
        out[i, 16] = st.relax == "adams"
    afs = np.array([s.afs == a for a in AFS], dtype=np.float32)
    return np.concatenate([out.reshape(-1), afs])
