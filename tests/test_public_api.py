"""The public contract survives importing any submodule: `dsno.sample` stays the solver function."""

import importlib
import pkgutil

import dsno


def test_importing_every_submodule_leaves_dsno_sample_callable():
    names = [m.name for m in pkgutil.walk_packages(dsno.__path__, prefix="dsno.")]
    assert "dsno.sample_images" in names and "dsno.trust.pt2_archive" in names
    for name in names:
        importlib.import_module(name)
    from dsno.solvers import sample
    assert dsno.sample is sample and callable(dsno.sample)
    assert dsno.load_sampler.__module__ == "dsno.sampler"
