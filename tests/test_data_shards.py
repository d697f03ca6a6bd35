"""Shard files and the manifest: round trip, checksums, corruption, untrusted manifests, fingerprints."""

import copy
import hashlib
import json

import numpy as np
import pytest

from dsno.data import (
    CorruptShardError,
    DatasetError,
    DatasetNotFoundError,
    FingerprintMismatchError,
    Manifest,
    check_fingerprint,
    load_manifest,
    make_fingerprint,
    verify_dataset,
)
from dsno.data.manifest import MANIFEST_NAME, write_json_atomic
from dsno.data.shards import NpyStreamWriter, map_npy, write_shard

TIMES = [0.75, 0.5, 0.0]
SHAPE = (2, 3, 3)


def toy_manifest(num=7, shard_size=3):
    fp = make_fingerprint(teacher={"class": "Toy"}, solver={"name": "toy", "order": 1, "options": {}},
                          grid=[1.0, 0.5, 0.25, 0.0], times=TIMES, state_shape=SHAPE)
    return Manifest.new(fp, seed=0, num_trajectories=num, shard_size=shard_size)


def write_toy_dataset(folder, num=7, shard_size=3, batch=2):
    """Shards of known random values, written in batches; returns (manifest, x_T, states)."""
    m = toy_manifest(num, shard_size)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((num, *SHAPE)).astype(np.float32)
    states = rng.standard_normal((num, len(TIMES), *SHAPE)).astype(np.float32)
    for i in range(m.num_shards):
        lo, hi = i * shard_size, i * shard_size + m.expected_count(i)
        batches = [(x_T[j:min(j + batch, hi)], states[j:min(j + batch, hi)]) for j in range(lo, hi, batch)]
        m.shards.append(write_shard(folder, m, i, batches))
    m.complete = True
    write_json_atomic(folder / MANIFEST_NAME, m.to_dict())
    return m, x_T, states


def test_round_trip_values_and_checksums(tmp_path):
    m, x_T, states = write_toy_dataset(tmp_path)
    assert [s.count for s in m.shards] == [3, 3, 1]
    loaded = verify_dataset(tmp_path, full=True)
    assert loaded.to_dict()["shards"] == m.to_dict()["shards"]
    for s in loaded.shards:
        lo = s.index * 3
        for role, ref in (("x_T", x_T), ("states", states)):
            path = tmp_path / s.files[role].name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == s.files[role].sha256
            assert path.stat().st_size == s.files[role].bytes
            plain = np.load(path, mmap_mode="r")  # ordinary .npy, readable by NumPy itself
            np.testing.assert_array_equal(plain, ref[lo:lo + s.count])
            mapped = map_npy(path, loaded.expected_shape(s.index, role))
            np.testing.assert_array_equal(mapped, ref[lo:lo + s.count])
            assert not mapped.flags.writeable
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_writer_is_atomic_and_exclusive(tmp_path):
    w = NpyStreamWriter(tmp_path / "a.npy", (2, 3))
    w.write(np.ones((1, 3), np.float32))
    assert not (tmp_path / "a.npy").exists() and (tmp_path / "a.npy.tmp").exists()
    with pytest.raises(DatasetError, match="another process"):
        NpyStreamWriter(tmp_path / "a.npy", (2, 3))
    with pytest.raises(ValueError, match="1 of 2 rows"):
        w.commit()
    with pytest.raises(ValueError, match="do not fit"):
        w.write(np.ones((1, 4), np.float32))
    w.abort()
    assert list(tmp_path.iterdir()) == []
    # a batch iterator that fails mid-shard leaves neither file behind
    m = toy_manifest()

    def failing():
        yield np.zeros((2, *SHAPE), np.float32), np.zeros((2, 3, *SHAPE), np.float32)
        raise RuntimeError("solver crashed")

    with pytest.raises(RuntimeError, match="solver crashed"):
        write_shard(tmp_path, m, 0, failing())
    assert list(tmp_path.iterdir()) == []


def test_flipped_byte_is_named_with_the_fix(tmp_path):
    m, _, _ = write_toy_dataset(tmp_path)
    victim = tmp_path / m.shards[1].files["states"].name
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    verify_dataset(tmp_path, full=False)  # same size and header: only the checksum sees it
    with pytest.raises(CorruptShardError) as err:
        verify_dataset(tmp_path, full=True)
    assert err.value.problems[0][:2] == (1, "shard-00001.states.npy")
    assert len(err.value.problems) == 1
    assert "shard-00001.states.npy" in str(err.value) and "sha256" in str(err.value)
    assert "data.repair=true" in str(err.value)


def test_truncated_and_missing_files(tmp_path):
    m, _, _ = write_toy_dataset(tmp_path)
    (tmp_path / "shard-00000.x_T.npy").write_bytes((tmp_path / "shard-00000.x_T.npy").read_bytes()[:-4])
    (tmp_path / "shard-00002.states.npy").unlink()
    with pytest.raises(CorruptShardError) as err:
        verify_dataset(tmp_path, full=False)
    problems = {(i, name): what for i, name, what in err.value.problems}
    assert set(problems) == {(0, "shard-00000.x_T.npy"), (2, "shard-00002.states.npy")}
    assert "manifest says" in problems[0, "shard-00000.x_T.npy"]
    assert problems[2, "shard-00002.states.npy"] == "file is missing"


def test_wrong_shape_file_is_reported(tmp_path):
    m, _, _ = write_toy_dataset(tmp_path)
    path = tmp_path / "shard-00000.x_T.npy"
    wrong = np.zeros((3, 3, 2, 3), np.float32)  # same byte count, other shape
    np.save(path, wrong)
    d = json.loads((tmp_path / MANIFEST_NAME).read_text())
    d["shards"][0]["files"]["x_T"]["bytes"] = path.stat().st_size
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(CorruptShardError, match=r"expected float32 \(3, 2, 3, 3\)"):
        verify_dataset(tmp_path, full=False)


def test_untrusted_manifest_cannot_point_outside(tmp_path):
    m, _, _ = write_toy_dataset(tmp_path)
    d = m.to_dict()
    evil = copy.deepcopy(d)
    evil["shards"][0]["files"]["x_T"]["name"] = "../../etc/passwd"
    with pytest.raises(DatasetError, match="expected 'shard-00000.x_T.npy'"):
        Manifest.from_dict(evil)
    for key, value, message in (("format_version", 3, "unsupported format_version 3"),
                                ("num_trajectories", -1, "num_trajectories must be an integer >= 1")):
        with pytest.raises(DatasetError, match=message):
            Manifest.from_dict({**d, key: value})
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_a_format_version_1_manifest_reads_its_old_key_names_as_the_new_ones(tmp_path):
    m, _, _ = write_toy_dataset(tmp_path)
    d = m.to_dict()
    fp = {("sample_shape" if k == "state_shape" else k): v for k, v in d["fingerprint"].items()}
    old = Manifest.from_dict({**d, "format_version": 1, "fingerprint": fp})
    assert old.state_shape == m.state_shape == (2, 3, 3) and old.fingerprint == m.fingerprint
    assert old.to_dict()["format_version"] == 2 and "sample_shape" not in old.to_dict()["fingerprint"]
    with pytest.raises(DatasetError, match=r"^manifest fingerprint: key 'sample_shape' is named 'state_shape' "
                                           r"since format_version 2; rename it 'state_shape'$"):
        Manifest.from_dict({**d, "fingerprint": fp})
    solver = {**d["fingerprint"]["solver"], "schedule_sha256": "b501184099895c44"}     # a usf data set's entry
    old = Manifest.from_dict({**d, "format_version": 1, "fingerprint": {**fp, "solver": solver}})
    assert old.fingerprint["solver"]["solver_schedule_sha256"] == "b501184099895c44"
    assert "schedule_sha256" not in old.fingerprint["solver"]
    with pytest.raises(DatasetError, match=r"^manifest fingerprint.solver: key 'schedule_sha256' is named "
                                           r"'solver_schedule_sha256' since format_version 2; rename it"):
        Manifest.from_dict({**d, "fingerprint": {**d["fingerprint"], "solver": solver}})


def test_missing_dataset_says_how_to_make_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="python -m data_gen"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="has no manifest.json.*python -m data_gen"):
        load_manifest(tmp_path)
    assert issubclass(DatasetNotFoundError, ValueError)


def test_check_fingerprint_diff_and_tolerance(tmp_path):
    m, _, _ = write_toy_dataset(tmp_path)
    fp = m.fingerprint
    check_fingerprint(tmp_path, fp)
    check_fingerprint(m, {"times": [t * (1 + 1e-12) for t in TIMES]})  # within 1e-9 relative
    check_fingerprint(m, {"state_shape": (2, 3, 3)})  # tuples are JSON lists
    bad = {**fp, "times": [0.75, 0.5 + 1e-6, 0.0], "teacher": {"class": "Other"},
           "solver": {**fp["solver"], "order": 3}}
    with pytest.raises(FingerprintMismatchError) as err:
        check_fingerprint(tmp_path, bad)
    text = str(err.value)
    assert "times[1]: dataset 0.5 vs expected 0.500001" in text
    assert "teacher.class: dataset 'Toy' vs expected 'Other'" in text
    assert "solver.order: dataset 1 vs expected 3" in text
    assert {d[0] for d in err.value.differences} == {"times[1]", "teacher.class", "solver.order"}
    with pytest.raises(FingerprintMismatchError, match=r"grid: dataset \[1.0, 0.5, 0.25, 0.0\] vs expected"):
        check_fingerprint(m, {"grid": [1.0, 0.0]})
    with pytest.raises(FingerprintMismatchError, match="extra: dataset <missing> vs expected 1"):
        check_fingerprint(m, {"extra": 1})


def test_make_fingerprint_validates():
    kw = dict(teacher={"class": "Toy"}, solver={"name": "toy"}, grid=[1.0, 0.0], times=[0.0])
    assert make_fingerprint(**kw, state_shape=(1, 2, 2))["dtype"] == "float32"
    with pytest.raises(ValueError, match="state_shape must be"):
        make_fingerprint(**kw, state_shape=(1, 0, 2))
    with pytest.raises(ValueError, match=r"fingerprint.times\[0\] is nan"):
        make_fingerprint(**{**kw, "times": [float("nan")]}, state_shape=(1,))
    with pytest.raises(ValueError, match="fingerprint.teacher.fn has a value of type function"):
        make_fingerprint(**{**kw, "teacher": {"fn": lambda: 0}}, state_shape=(1,))
