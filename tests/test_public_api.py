"""The public contract survives importing any submodule: `dsno.solve` stays the solver function."""

import importlib
import pkgutil

import pytest

import dsno


def test_importing_every_submodule_leaves_dsno_solve_callable():
    names = [m.name for m in pkgutil.walk_packages(dsno.__path__, prefix="dsno.")]
    assert "dsno.sample_images" in names and "dsno.trust.pt2_archive" in names
    for name in names:
        importlib.import_module(name)
    from dsno.solvers import solve
    assert dsno.solve is solve and callable(dsno.solve)
    assert dsno.load_sampler.__module__ == "dsno.sampler"


def test_the_old_name_of_the_solver_function_is_refused_naming_the_new_one():
    import dsno.solvers
    with pytest.raises(AttributeError, match=r"^dsno.sample was renamed: use dsno.solve$"):
        dsno.sample
    with pytest.raises(AttributeError, match=r"^dsno.solvers.sample was renamed: use dsno.solvers.solve$"):
        dsno.solvers.sample
    with pytest.raises(ImportError, match="sample"):
        from dsno.solvers import sample  # noqa: F401
    with pytest.raises(AttributeError, match=r"^module 'dsno' has no attribute 'nothing'$"):
        dsno.nothing
    assert not hasattr(dsno, "sample")
