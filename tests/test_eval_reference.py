"""What eval measures against: FID's reference (the user's file when named; the shipped digits only for
the project's digit teachers; else a clear error up front), the reference solve's size by the
teacher's cost, and timing as a median over repeats with its spread."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dsno.config import EvalConfig
from dsno.errors import UserFileNotFoundError
from dsno.stages.evaluation import (_add_fidelity, check_prerequisites, fidelity_plan, reference_steps,
                                    seconds_per_sample)


def run_config(kind, tmp_path=None, **eval_keys):
    return SimpleNamespace(teacher=SimpleNamespace(kind=kind), eval=EvalConfig(**eval_keys),
                           run_dir=str(tmp_path or "run"))


def real_images(path, n=10, c=1, size=8, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, c), dtype=np.uint8)
    np.savez(path, images=images)
    return images


@pytest.mark.parametrize("kind,channels", [("diffusers", 1), ("gmm_file", 1), ("diffusers", 3), ("my_kind", 1)])
def test_a_teacher_of_other_data_is_never_scored_against_the_shipped_digits(kind, channels):
    with pytest.raises(UserFileNotFoundError, match=f"FID needs real images of what teacher.kind={kind} models.*"
                       "set eval.fidelity_reference=FILE.npz.*or eval.fidelity=false"):
        check_prerequisites(run_config(kind), (channels, 8, 8))
    assert fidelity_plan(run_config(kind, fidelity=False), (channels, 8, 8)) == {
        "computed": False, "why": "eval.fidelity=false"}


@pytest.mark.parametrize("kind", ["mnist_gmm", "unet", "psld_mnist_gmm", "psld_unet"])
def test_the_digit_teachers_default_to_the_shipped_digits(kind):
    plan = fidelity_plan(run_config(kind), (1, 16, 16))
    assert plan["extractor"] == "digits" and plan["path"] is None and "shipped MNIST digits" in plan["reference"]


def test_a_named_reference_file_is_used_even_for_a_digit_teacher(tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(1)}, weights)          # a plain state dict: only its presence is checked here
    images = real_images(tmp_path / "real.npz")
    rc = run_config("mnist_gmm", tmp_path / "run", fidelity_reference=str(tmp_path / "real.npz"),
                    inception_weights=str(weights))
    check_prerequisites(rc, (1, 8, 8))
    plan = fidelity_plan(rc, (1, 8, 8))
    assert plan["extractor"] == "inception" and plan["path"] == str(tmp_path / "real.npz")
    assert plan["reference"] == f"the real images of eval.fidelity_reference={tmp_path / 'real.npz'}"
    seen = []

    def fidelity(samples, reference, **kw):
        seen.append((reference, kw["extractor"], kw["inception_weights"]))
        return {"fid": float(samples.mean()), "kid": 0.5, "kid_std": 0.1}

    monkeypatch.setattr("dsno.metrics.fidelity.compute_fidelity", fidelity)
    rows = [{"method": "a", "nfe": 1}, {"method": "c", "nfe": 1, "skipped": "x"}]
    _add_fidelity(rows, {"a@1": torch.full((10, 1, 8, 8), 0.25)}, (1, 8, 8), rc, plan)
    (reference, extractor, inception), = seen
    assert torch.equal(reference, torch.from_numpy(images).permute(0, 3, 1, 2))     # the file's pixels, no digits
    assert extractor == "inception" and inception == str(weights)
    assert rows[0] == {"method": "a", "nfe": 1, "fid": 0.25, "kid": 0.5, "kid_std": 0.1} and "fid" not in rows[1]


def test_reference_steps_follow_the_teachers_cost_unless_set():
    assert reference_steps(run_config("mnist_gmm"), has_network=False) == 500
    assert reference_steps(run_config("diffusers", nfe=[1, 2, 6]), has_network=True) == 50
    assert reference_steps(run_config("diffusers", nfe=[1, 20]), has_network=True) == 100
    assert reference_steps(run_config("diffusers", nfe=[1, 900]), has_network=True) == 500
    assert reference_steps(run_config("diffusers", reference_steps=7), has_network=True) == 7


def test_timing_is_the_median_of_repeats_with_its_spread():
    delays = iter([0.1, 0.3, 0.2])          # long enough that a loaded machine's scheduling delay is small

    def fn(x):
        time.sleep(next(delays))
        return x

    t = seconds_per_sample(fn, torch.zeros(2), repeats=3)
    assert t["median"] == pytest.approx(0.1, rel=0.2)        # per sample: the batch holds 2
    assert t["min"] == pytest.approx(0.05, rel=0.2) and t["max"] == pytest.approx(0.15, rel=0.2)


def test_a_cost_in_units_is_timed_pairwise_so_a_load_change_cancels():
    """The machine slows 3x between repeats: fn's time moves, its ratio to the unit timed beside it does not."""
    load = iter([1, 1, 3, 3, 3, 3])

    def work(seconds):
        def call(x):
            time.sleep(seconds * next(load))
            return x
        return call

    t = seconds_per_sample(work(0.1), torch.zeros(1), repeats=3, unit=work(0.05))
    assert t["per_unit"]["min"] == pytest.approx(2.0, rel=0.2) and t["per_unit"]["max"] == pytest.approx(2.0, rel=0.2)
    assert t["unit"]["min"] == pytest.approx(0.05, rel=0.2) and t["unit"]["max"] == pytest.approx(0.15, rel=0.2)
    assert t["min"] == pytest.approx(0.1, rel=0.2) and t["max"] == pytest.approx(0.3, rel=0.2)
