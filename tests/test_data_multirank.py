"""Rank sharding: a 2-rank run (with or without a process group) equals a 1-rank run, byte for byte."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsno.data import generate_dataset, load_manifest, make_fingerprint, merge_manifest
from dsno.data.generate import part_name

TIMES = [0.75, 0.5, 0.0]
SHAPE = (1, 3, 3)
NUM, SHARD, SEED = 11, 2, 5  # 6 shards, the last with one trajectory


def solve(x_T):
    t = torch.tensor(TIMES, dtype=x_T.dtype).view(1, -1, *([1] * (x_T.ndim - 1)))
    return x_T[:, None] * (1 + t) + t


def generate(folder, **kw):
    fp = make_fingerprint(teacher={"class": "Toy"}, solver={"name": "toy", "order": 1, "options": {}},
                          grid=[1.0, 0.75, 0.5, 0.25, 0.0], times=TIMES, state_shape=SHAPE)
    args = dict(solve=solve, fingerprint=fp, num_trajectories=NUM, shard_size=SHARD, state_shape=SHAPE,
                seed=SEED, batch_size=2, progress=False)
    return generate_dataset(folder, **{**args, **kw})


def snapshot(folder):
    folder = Path(folder)
    return (load_manifest(folder).to_dict()["shards"],
            {p.name: p.read_bytes() for p in sorted(folder.iterdir())
             if p.name not in ("manifest.json", "verified.json")})  # verified.json: which checks ran


def _worker(rank, world_size, init_file, out_dir, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        m = generate(out_dir)  # rank and world size come from the process group
        written = sorted(s.index for s in m.shards)
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps({"complete": m.complete, "shards": written}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_gloo_equal_one_rank(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), str(tmp_path)), nprocs=2)
    generate(tmp_path / "one")
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")
    for rank in (0, 1):  # after the final barrier every rank sees the merged, complete manifest
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"complete": True,
                                                                           "shards": list(range(6))}
    assert load_manifest(tmp_path / "two").complete


def test_ranks_without_process_group_merge_when_the_last_one_finishes(tmp_path):
    two = tmp_path / "two"
    first = generate(two, rank=1, world_size=2)
    assert not first.complete and sorted(s.index for s in first.shards) == [1, 3, 5]
    assert not (two / "manifest.json").exists()  # nothing is listed as a data set yet
    assert (two / part_name(1, 2)).exists()
    last = generate(two, rank=0, world_size=2)
    assert last.complete
    assert sorted(p.name for p in two.glob("manifest*")) == ["manifest.json"]  # parts merged away
    generate(tmp_path / "one")
    assert snapshot(two) == snapshot(tmp_path / "one")
    # merging again is a no-op
    before = (two / "manifest.json").read_bytes()
    assert merge_manifest(two, load_manifest(two), rank=1, world_size=2).complete
    assert (two / "manifest.json").read_bytes() == before


def test_resume_with_another_world_size(tmp_path):
    mixed = tmp_path / "mixed"
    generate(mixed, rank=2, world_size=3)  # shards 2 and 5 of a 3-rank run; the others never ran
    assert sorted(p.name for p in mixed.glob("manifest*")) == [part_name(2, 3)]

    def crash(x):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        generate(mixed, solve=crash)  # a single process takes over: it folds the part in first
    assert sorted(p.name for p in mixed.glob("manifest*")) == ["manifest.json"]
    assert [s.index for s in load_manifest(mixed).shards] == [2, 5]
    m = generate(mixed)  # and finishes the job
    assert m.complete
    assert sorted(p.name for p in mixed.glob("manifest*")) == ["manifest.json"]
    generate(tmp_path / "one")
    assert snapshot(mixed) == snapshot(tmp_path / "one")
