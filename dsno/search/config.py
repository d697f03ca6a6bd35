"""The search's configuration (`search.*` of a run config) and its checks against a budget.

`python -m dsno.search` (dsno.search.loop) reads it; its sizes are an experiment's to set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from dsno.checks import SEED_MAX, choice, count, fail, in_range
from dsno.schema import doc_field
from dsno.solvers import get as get_solver
from dsno.solvers.usf import AFS

MODES = ("full", "timesteps")
BASES = ("unipc", "dpm_solver_pp", "deis", "ipndm", "ddim")
NOISE_SEED_STRIDE = 1_000_003     # search.seed s draws its noise with the seeds STRIDE * s + 1 and + 2


@dataclass
class SearchConfig:
    """`python -m dsno.search` (dsno.search.loop): its sizes are an experiment's to set (a network teacher
    on a CPU needs a smaller search than the mixture). Its own ranges are checked here, for every entry
    point; the budget and the pinned times against the teacher's time range by `check_search`."""

    mode: str = doc_field("full", "full | timesteps (GITS / LD3-style: the grid of `base` only)")
    base: str = doc_field("unipc", "timesteps mode: the fixed solver (unipc | dpm_solver_pp | deis | ipndm | ddim)")
    base_order: int = doc_field(3, "timesteps mode: the fixed solver's order")
    afs: list = doc_field(doc="analytic first step choices searched: none, zero, mean",
                          factory=lambda: ["none", "zero", "mean"])
    batch: int = doc_field(256, "noise samples of the cheap metric")
    verify_batch: int = doc_field(512, "other noise samples of the full metric")
    reference_steps: int = doc_field(500, "float64 reference: DPM-Solver++ 3M, logSNR grid")
    initial: int = doc_field(300, "random candidates scored before the first round")
    rounds: int = doc_field(12, "rounds of predictor-guided evolution")
    proposals: int = doc_field(1500, "children ranked by the predictor per round")
    scored_per_round: int = doc_field(40, "candidates scored with the cheap metric per round")
    refine: int = doc_field(3, "sweeps of coordinate descent on the best candidate's times (0: none)")
    explore: float = doc_field(0.25, "share of a round's scores drawn at random (held out for tau)")
    parents: int = doc_field(15, "best candidates the next round's children are drawn from")
    verify_top: int = doc_field(10, "best candidates re-scored with the full metric at the end")
    pin_times: list = doc_field(doc="times every searched grid passes through (e.g. data.times)", factory=list)
    seed: int = doc_field(0, "seed of the search's draws and noise")
    resume: bool = doc_field(True, "continue from <name>.scored.json when it exists")
    out: Optional[str] = doc_field(None, "the folder of the solver schedules; default: <run_dir>/solver_schedules")
    threads: int = doc_field(1, "torch CPU threads (0: torch's default); small batches run best on one")

    def __post_init__(self) -> None:
        choice("search.mode", self.mode, MODES)
        choice("search.base", self.base, BASES)
        top = max(get_solver(self.base).orders)
        count("search.base_order", self.base_order, top, f"the orders of {self.base} are 1..{top}")
        afs = list(self.afs)
        if not afs or any(a not in AFS for a in afs):
            fail("search.afs", afs, f"must be a non-empty list of {', '.join(AFS)}")
        for key in ("batch", "verify_batch"):
            count(f"search.{key}", getattr(self, key), 65536, "larger batches only exhaust memory")
        count("search.reference_steps", self.reference_steps, 10_000, "a float64 3rd-order solve converges "
               "long before that")
        count("search.initial", self.initial, 10**6, "a million random candidates is past any search")
        count("search.proposals", self.proposals, 10**6, "the predictor ranks at most a million children a round")
        count("search.scored_per_round", self.scored_per_round, 10**5, "each one is a teacher solve")
        count("search.parents", self.parents, 10**5, "more parents than any search scores")
        count("search.verify_top", self.verify_top, 10**4, "each one is a solve on search.verify_batch")
        count("search.rounds", self.rounds, 10**4, "each round is search.scored_per_round solves", lo=0)
        count("search.refine", self.refine, 50, "sweep k moves a time by 0.2 / 2^k, below float64 resolution "
               "after 50", lo=0)
        count("search.threads", self.threads, 256, "more threads than any machine has cores (0: torch's "
               "default)", lo=0)
        in_range("search.explore", self.explore, 0.0, 1.0, hi_open=True)
        count("search.seed", self.seed, (SEED_MAX - 2) // NOISE_SEED_STRIDE, f"the noise seeds "
               f"{NOISE_SEED_STRIDE:,} * seed + 1 and + 2 are 64-bit signed integers", lo=0)
        pins = list(self.pin_times)
        if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) for t in pins):
            fail("search.pin_times", pins, "must be a list of finite times")
        if len(set(pins)) != len(pins):
            fail("search.pin_times", pins, "must be distinct times")


def check_search(sc: SearchConfig, nfe: Optional[int], t_start: float, t_end: float) -> None:
    """The search's keys against its budget `nfe` (None: a run that does not search) and the time range
    (t_end, t_start) of the teacher's ODE (t_start inf: known only once the teacher is loaded; the search
    checks again then). ConfigError, one line."""
    if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= 50):
        fail("nfe", nfe, "must be an integer in 1..50 (python -m dsno.search nfe=5)")
    pins = list(sc.pin_times)
    if any(not t_end < t < t_start for t in pins):
        fail("search.pin_times", pins, f"must be distinct times strictly between t_end={t_end:g} and "
              f"T={t_start:g} (drop the end points)")
    if nfe is not None and len(pins) > nfe - 1:
        fail("search.pin_times", pins, f"{len(pins)} pinned times need nfe >= {len(pins) + 1}")
