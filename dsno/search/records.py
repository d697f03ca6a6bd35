"""The records of a search: one scored candidate (`Scored`) and the search so far (`SearchState`), which is
what <name>.scored.json holds (format version 1, unchanged since the first search)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsno.errors import UserError
from dsno.jsonfile import read_json_file
from dsno.solvers import usf

VERSION = 1
ROW_KEY = "schedule"      # the key of a row's solver schedule in a scored file (its format since version 1)


class SearchError(UserError):
    """A search cannot run as configured (or cannot resume); the message names the key or file."""


@dataclass(frozen=True)
class Scored:
    """One candidate as scored: its solver schedule (the `usf.to_dict` form it is stored in, under the row
    key "schedule": the file format of every scored file so far, kept so they resume), its RMSE on the
    search batch (inf when not finite; None for a duplicate), the round that scored it (0: the initial
    population, 1..rounds: the rounds, rounds + 1: the refinement), the predictor's log-RMSE guess and
    whether it was one of the round's random (explore) picks. A duplicate is an initial draw already
    scored: it keeps its row so that a resume counts the population's draws."""

    solver_schedule: dict[str, Any]
    rmse: float | None
    round: int
    predicted: float | None = None
    explore: bool = False
    duplicate: bool = False

    def candidate(self) -> usf.SolverSchedule:
        return usf.from_dict(self.solver_schedule)

    def to_json(self) -> dict[str, Any]:
        if self.duplicate:
            return {ROW_KEY: self.solver_schedule, "rmse": None, "round": self.round, "duplicate": True}
        return {ROW_KEY: self.solver_schedule, "rmse": self.rmse, "round": self.round, "predicted": self.predicted,
                "explore": self.explore}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "Scored":
        return cls(solver_schedule=row[ROW_KEY], rmse=row["rmse"], round=int(row["round"]),
                   predicted=row.get("predicted"), explore=bool(row.get("explore", False)), duplicate=bool(row.get("duplicate", False)))


@dataclass
class SearchState:
    """A search so far: what it must match to resume (`fingerprint`), every candidate scored in order,
    the rounds done, the predictor's Kendall tau of each round, and the cost spent (wall and CPU
    seconds, teacher calls and the samples they evaluated)."""

    fingerprint: dict[str, Any]
    scored: list[Scored] = field(default_factory=list)
    rounds_done: int = 0
    taus: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    teacher_calls: int = 0
    teacher_samples: int = 0
    version: int = VERSION

    def ranked(self, last_round: int | None = None) -> list[Scored]:
        """The scored candidates (duplicates left out; with last_round, those of rounds <= last_round only),
        best (lowest RMSE) first; ties in scoring order."""
        return sorted((r for r in self.scored if not r.duplicate and (last_round is None or r.round <= last_round)),
                      key=lambda r: r.rmse)

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "fingerprint": self.fingerprint,
                           "scored": [r.to_json() for r in self.scored], "rounds_done": self.rounds_done,
                           "taus": self.taus, "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                           "teacher_calls": self.teacher_calls, "teacher_samples": self.teacher_samples})

    @classmethod
    def load(cls, path: Path, fingerprint: dict[str, Any], resume: bool) -> "SearchState":
        """The state in `path` when it exists and resume is on, else a fresh one. SearchError (one line)
        when the file is not a scored-candidates file, or belongs to a search of another fingerprint
        (it names the first key that differs)."""
        if not path.is_file() or not resume:
            return cls(fingerprint=fingerprint)
        how = "it is the search's scored-candidates file: delete it or set search.resume=false"
        d = read_json_file(path, SearchError, how, expect=dict)
        old = d.get("fingerprint", {})
        if not isinstance(old, dict):
            raise SearchError(f"scored-candidates file {path} is not whole (its fingerprint is not a mapping); {how}")
        diff = sorted(k for k in set(old) | set(fingerprint)
                      if _canonical(old.get(k)) != _canonical(fingerprint.get(k)))
        if diff:
            raise SearchError(f"scored-candidates file {path} belongs to another search ({diff[0]} differs); delete "
                              f"it, set search.resume=false, or search.out=ANOTHER_DIR")
        try:
            return cls(fingerprint=old, scored=[Scored.from_json(r) for r in d["scored"]],
                       rounds_done=int(d["rounds_done"]), taus=[float(t) for t in d["taus"]],
                       wall_s=float(d["wall_s"]), cpu_s=float(d.get("cpu_s", 0.0)),
                       teacher_calls=int(d["teacher_calls"]), teacher_samples=int(d["teacher_samples"]),
                       version=int(d.get("version", VERSION)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SearchError(f"scored-candidates file {path} is not whole ({type(e).__name__}: {e}); {how}") from None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
