"""dsno.metrics: the shipped digit classifier, its torch-fidelity extractor, and compute_fidelity.

Sanity margins were measured with the shipped classifier (2,500 real digits vs the other 2,500):
FID 1.41, IS 9.45, precision 0.89, recall 0.90; the same digits plus N(0, 0.5^2) noise: FID 235,
IS 4.2, recall 0.23.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from dsno.digits import load_digits
from dsno.metrics import (
    DIGIT_EXTRACTOR,
    DigitFeatureExtractor,
    ImageTensorDataset,
    compute_fidelity,
    from_uint8,
    load_digit_classifier,
    reference_digits,
    register_digit_extractor,
    to_uint8,
)
from dsno.metrics.digit_classifier import accuracy, asset_path, held_out_split, random_shift, tensors_sha256

FAST_KID = dict(kid_subsets=20)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits(16)


@pytest.fixture(scope="module")
def halves() -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves (2,500 each) of the real digits, float in [-1, 1]."""
    x = reference_digits(16)
    assert x.shape == (5000, 1, 16, 16) and x.min() == -1.0 and x.max() == 1.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:2500]], x[perm[2500:]]


@pytest.fixture(scope="module")
def real_vs_real(halves) -> dict[str, float]:
    a, b = halves
    return compute_fidelity(a, b, **FAST_KID)


@pytest.fixture(scope="module")
def noised_vs_real(halves) -> dict[str, float]:
    a, b = halves
    noised = (a + 0.5 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    return compute_fidelity(noised, b, **FAST_KID)


# ---- the digit classifier ------------------------------------------------------------------------------------------


def test_shipped_classifier_accuracy_and_record(digits):
    images, labels = digits
    _, held_out = held_out_split(labels)
    assert len(held_out) == 500 and torch.equal(torch.bincount(labels[held_out]), torch.full((10,), 50))
    model = load_digit_classifier(16)
    acc = accuracy(model, images[held_out], labels[held_out])
    assert acc >= 0.95
    record = json.loads(asset_path(16).with_suffix(".json").read_text())
    assert record["file_sha256"] == hashlib.sha256(asset_path(16).read_bytes()).hexdigest()
    assert record["tensors_sha256"] == tensors_sha256(model.state_dict())
    assert record["held_out_accuracy"] == pytest.approx(acc, abs=1e-3)
    assert record["command"].startswith("python -m dsno.metrics.digit_classifier --size 16")


def test_held_out_split_is_fixed_and_disjoint(digits):
    _, labels = digits
    train, held_out = held_out_split(labels)
    assert torch.equal(held_out, held_out_split(labels)[1])
    assert len(train) + len(held_out) == 5000 and not set(train.tolist()) & set(held_out.tolist())


def test_random_shift_translates_with_background_fill():
    x = torch.full((64, 1, 16, 16), -1.0)
    x[:, :, 8, 8] = 1.0
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.all(y.sum(dim=(1, 2, 3)) == x.sum(dim=(1, 2, 3)))
    where = torch.nonzero(y[:, 0] == 1.0)[:, 1:]
    assert where.min() >= 6 and where.max() <= 10 and len(torch.unique(where, dim=0)) > 10


def test_missing_classifier_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m dsno.metrics.digit_classifier --size 16"):
        load_digit_classifier(16, tmp_path / "none.safetensors")


# ---- image conversion ----------------------------------------------------------------------------------------------


def test_uint8_round_trip_and_range():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(from_uint8(u)), u)
    assert to_uint8(torch.tensor([-1.0, 1.0, -3.0, 3.0, 0.0])).tolist() == [0, 255, 0, 255, 128]
    with pytest.raises(TypeError, match="int64"):
        to_uint8(torch.zeros(2, dtype=torch.int64))


# ---- the torch-fidelity feature extractor --------------------------------------------------------------------------


def test_extractor_registered_idempotently():
    assert DIGIT_EXTRACTOR == "dsno-digits16"
    assert FEATURE_EXTRACTORS_REGISTRY[DIGIT_EXTRACTOR] is DigitFeatureExtractor
    assert register_digit_extractor(16) == DIGIT_EXTRACTOR == register_digit_extractor(16)
    assert FEATURE_EXTRACTORS_REGISTRY[DIGIT_EXTRACTOR] is DigitFeatureExtractor


def test_foreign_extractor_under_our_name_is_an_error(monkeypatch):
    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, "dsno-digits99", torch_fidelity.FeatureExtractorBase)
    with pytest.raises(ValueError, match="dsno-digits99.*taken"):
        register_digit_extractor(99)


def test_extractor_features_match_classifier(digits):
    images = digits[0][:40]
    u = to_uint8(images)
    fe = DigitFeatureExtractor(DIGIT_EXTRACTOR, ["logits", "features"])
    logits, features = fe(u)
    ref_features, ref_logits = load_digit_classifier(16).features_and_logits(from_uint8(u))
    assert features.shape == (40, 128) and logits.shape == (40, 10)
    torch.testing.assert_close(features, ref_features)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(fe(u.expand(-1, 3, -1, -1))[0], logits)    # RGB input is averaged to gray
    big = to_uint8(load_digits(28)[0][:40])                                  # other sizes are resized
    assert (fe(big)[0].argmax(1) == logits.argmax(1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="uint8"):
        fe(images)


def test_extractor_through_calculate_metrics(halves):
    a, b = halves
    raw = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(to_uint8(a[:500])), input2=ImageTensorDataset(to_uint8(b[:500])),
        feature_extractor=DIGIT_EXTRACTOR, fid=True, isc=True, cuda=False, verbose=False, cache=False,
        save_cpu_ram=True)
    ours = compute_fidelity(a[:500], b[:500], metrics=("fid", "isc"))
    assert raw[torch_fidelity.KEY_METRIC_FID] == pytest.approx(ours["fid"], rel=1e-6)
    assert raw[torch_fidelity.KEY_METRIC_ISC_MEAN] == pytest.approx(ours["is_mean"], rel=1e-6)
    assert 0 < ours["fid"] < 20 and ours["is_mean"] > 8


# ---- sanity of the numbers -----------------------------------------------------------------------------------------


def test_real_vs_real_is_close(real_vs_real):
    r = real_vs_real
    assert set(r) == {"fid", "kid", "kid_std", "is_mean", "is_std", "precision", "recall"}
    assert 0 < r["fid"] < 5
    assert abs(r["kid"]) < 3 * r["kid_std"] + 1.0
    assert 9.0 < r["is_mean"] <= 10.0
    assert r["precision"] > 0.8 and r["recall"] > 0.8


def test_noise_makes_everything_worse(real_vs_real, noised_vs_real):
    r, n = real_vs_real, noised_vs_real
    assert n["fid"] > 100 and n["fid"] > 50 * r["fid"]
    assert n["kid"] > 10 * max(n["kid_std"], r["kid_std"])
    assert n["is_mean"] < r["is_mean"] - 3
    assert n["recall"] < 0.5 < r["recall"]


def test_isc_alone_needs_no_reference(halves):
    r = compute_fidelity(halves[0], None, metrics=("isc",))
    assert set(r) == {"is_mean", "is_std"} and r["is_mean"] > 9.0


# ---- caching of the reference --------------------------------------------------------------------------------------


def test_reference_cache_is_hit(tmp_path, halves, monkeypatch):
    a, b = halves[0][:300], halves[1][:600]
    seen = []
    forward = DigitFeatureExtractor.forward

    def counting_forward(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(DigitFeatureExtractor, "forward", counting_forward)
    kw = dict(cache_dir=tmp_path, cache_name="digits-test", kid_subset_size=200, kid_subsets=5)
    first = compute_fidelity(a, b, **kw)
    assert sum(seen) == 900
    files = sorted(p.name for p in tmp_path.iterdir())
    name = f"digits-test-{DIGIT_EXTRACTOR}-"
    assert files and all(f.startswith(name) for f in files) and any("features-features" in f for f in files)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    seen.clear()
    second = compute_fidelity(a, b, **kw)
    assert sum(seen) == 300                                      # only the samples went through the network
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes

    seen.clear()
    compute_fidelity(a, b[:500], **kw)                            # another reference set: its own entry
    assert sum(seen) == 800 and len(list(tmp_path.iterdir())) == 2 * len(files)


# ---- Inception path: local weights only ----------------------------------------------------------------------------


def test_missing_inception_weights_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    expected = os.path.join(str(tmp_path / "hub"), "checkpoints", "weights-inception-2015-12-05-6726825d.pth")
    images = torch.zeros(10, 3, 32, 32)
    with pytest.raises(FileNotFoundError) as err:
        compute_fidelity(images, images, extractor="inception")
    assert expected in str(err.value)
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        compute_fidelity(images, images, extractor="inception", inception_weights=tmp_path / "no_such.pth")


def _random_inception_weights(path, monkeypatch) -> None:
    """Save randomly initialised Inception weights in torch-fidelity's layout, building the net without loading."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe_mod

    with monkeypatch.context() as m:
        m.setattr(fe_mod, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe_mod.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"])
    torch.save(net.state_dict(), path)


def test_inception_runs_from_a_local_file_without_download(tmp_path, monkeypatch):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    _random_inception_weights(weights, monkeypatch)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    os.makedirs(tmp_path / "checkpoints")
    os.replace(weights, tmp_path / "checkpoints" / weights.name)   # found in the hub cache, not passed
    gray = torch.rand(10, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = compute_fidelity(gray, None, extractor="inception", metrics=("isc",))
    assert set(r) == {"is_mean", "is_std"} and 1.0 <= r["is_mean"] < 1008


def test_pickled_inception_file_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        compute_fidelity(torch.zeros(10, 3, 8, 8), None, extractor="inception", inception_weights=path,
                         metrics=("isc",))


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_bad_arguments_are_named(halves):
    a = halves[0][:20]
    with pytest.raises(ValueError, match=r"unknown feature extractor 'clip'.*\['digits', 'inception'\]"):
        compute_fidelity(a, a, extractor="clip")
    with pytest.raises(ValueError, match="ppl"):
        compute_fidelity(a, a, metrics=("fid", "ppl"))
    with pytest.raises(ValueError, match="kid_subset_size must be in \\[2, 20\\]"):
        compute_fidelity(a, a, kid_subset_size=21)
    with pytest.raises(ValueError, match="same \\[C, H, W\\]"):
        compute_fidelity(a, torch.zeros(20, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 10"):
        compute_fidelity(a[:5], a)
    with pytest.raises(ValueError, match="reference must not be None"):
        compute_fidelity(a, None, metrics=("fid",))
    with pytest.raises(ValueError, match="inception_weights is only used"):
        compute_fidelity(a, a, inception_weights="x.pth")
