"""The search's records (dsno.search.records) keep the scored file's format: a file written by the search
before it was a recipe of typed records resumes to where an uninterrupted run ends, also from inside
the refinement; the unconditional fingerprint and the reference cache's names stay those of that search."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from dsno.search import SearchConfig, SearchError, loop, search
from dsno.search.conditioning import Conditioning
from dsno.search.records import SearchState
from test_usf_search import TINY, mixture

# tests/data/search_v1/nfe3.scored.json: written by the search of commit 0aa21f6 (its state a dict mutated
# by closures), `search(mixture(), 3, SearchConfig(**SMALL), OUT, 1e-3, torch.float64)` stopped by a
# KeyboardInterrupt raised from its 32nd call of loop._score: 39 rows (8 duplicates), the last one of the
# refinement.
OLD = Path(__file__).resolve().parent / "data" / "search_v1"
NAME = "nfe3.scored.json"
SMALL = dict(afs=["none"], batch=16, verify_batch=16, reference_steps=40, initial=10, rounds=1, proposals=20,
             scored_per_round=4, verify_top=2, refine=1)


def _rows(folder: Path) -> list[dict]:
    return json.loads((folder / NAME).read_text())["scored"]


def test_a_scored_file_of_the_old_search_resumes_to_the_uninterrupted_result(tmp_path):
    """Interrupted inside the refinement: the refinement restarts from the rounds' best (the old loop
    restarted from the refined candidate and scored more candidates than an uninterrupted run)."""
    teacher = mixture()
    full = search(teacher, 3, SearchConfig(**SMALL), tmp_path / "full", 1e-3, torch.float64, progress=False)
    shutil.copytree(OLD, tmp_path / "old")
    before = _rows(tmp_path / "old")
    assert [r["round"] for r in before[-3:]] == [1, 1, 2]
    again = search(teacher, 3, SearchConfig(**SMALL), tmp_path / "old", 1e-3, torch.float64, progress=False)
    assert _rows(tmp_path / "old")[: len(before)] == before
    assert _rows(tmp_path / "old") == _rows(tmp_path / "full")
    assert again["solver_schedule"] == full["solver_schedule"]
    assert again["score"]["rmse_verify"] == full["score"]["rmse_verify"]


def test_the_scored_file_format_is_unchanged():
    """Read into SearchState and written back, the old search's file is the same bytes."""
    text = (OLD / NAME).read_text()
    fp = json.loads(text)["fingerprint"]
    state = SearchState.load(OLD / NAME, fp, resume=True)
    assert state.to_json() == text
    assert len(state.scored) == 39 and state.rounds_done == 1 and sum(r.duplicate for r in state.scored) == 8


def test_a_scored_file_missing_a_field_is_one_line(tmp_path):
    d = json.loads((OLD / NAME).read_text())
    del d["scored"][3]["rmse"]
    (tmp_path / NAME).write_text(json.dumps(d))
    with pytest.raises(SearchError, match=r"is not whole \(KeyError: 'rmse'\); it is the search's scored-candidates "
                                          r"file: delete it or set search.resume=false$") as e:
        search(mixture(), 3, SearchConfig(**SMALL), tmp_path, 1e-3, torch.float64, progress=False)
    assert "\n" not in str(e.value)


def test_the_unconditional_fingerprint_and_reference_names_are_pinned(tmp_path):
    """The values the search of 0aa21f6 computed for TINY (its scored file's fingerprint, its .reference
    files), so its scored files and reference caches are still found."""
    teacher = mixture()
    assert Conditioning.of(teacher) is None
    fp = loop.fingerprint(teacher, 4, SearchConfig(**TINY), 1e-3, torch.float64, None)
    assert hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest() == \
        "7ccbccecb9b5294d3674f254fef8950b54e43152c91aff194b3af4c8b29868d1"
    batch, verify = loop.noise_batches(teacher, SearchConfig(**TINY), (1, 4, 4), torch.float64, 1e-3, None, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4326eb54393b-search.safetensors",
                                                         "4326eb54393b-verify.safetensors"]
    assert batch.labels is None and batch.teacher is teacher and verify.x.shape == (32, 1, 4, 4)
