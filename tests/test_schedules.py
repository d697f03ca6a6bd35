import math

import numpy as np
import pytest
import torch

from dsno import VPSchedule


def test_linear_closed_form_values():
    s = VPSchedule.linear(0.1, 20.0)
    for t in (1e-3, 0.1, 0.5, 1.0):
        log_a = -(20.0 - 0.1) * t * t / 4 - 0.1 * t / 2
        a = math.exp(log_a)
        sig = math.sqrt(1 - a * a)
        assert float(s.alpha(t)) == pytest.approx(a, rel=1e-14)
        assert float(s.sigma(t)) == pytest.approx(sig, rel=1e-12)
        assert float(s.lam(t)) == pytest.approx(math.log(a / sig), rel=1e-12)
    # the values quoted in the solver notes
    assert float(s.lam(1.0)) == pytest.approx(-5.03, abs=6e-3)
    assert float(s.lam(1e-3)) == pytest.approx(4.56, abs=5e-3)


def test_cosine_closed_form_values():
    s = VPSchedule.cosine(0.008)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1e-3, 0.3, 0.9):
        assert float(s.alpha(t)) ** 2 == pytest.approx(f(t) / f(0.0), rel=1e-12)


def test_discrete_matches_cumprod_and_linear_vp():
    betas = np.linspace(1e-4, 0.02, 1000)
    s = VPSchedule.discrete(betas)
    t = (np.arange(1000) + 1) / 1000
    np.testing.assert_allclose(s.alpha(t).numpy() ** 2, np.cumprod(1 - betas), rtol=1e-12)
    # the DDPM betas map onto the continuous linear VP (beta 0.1 .. 20)
    lin = VPSchedule.linear()
    tt = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    np.testing.assert_allclose(s.log_alpha(tt).numpy(), lin.log_alpha(tt).numpy(), rtol=3e-2, atol=1e-4)


@pytest.mark.parametrize("sched", [VPSchedule.linear(), VPSchedule.cosine(), VPSchedule.ddpm_linear()],
                         ids=["linear", "cosine", "discrete"])
def test_t_of_lam_inverts_lam(sched):
    t = torch.linspace(max(sched.t_min, 1e-3), sched.T, 200, dtype=torch.float64)
    back = sched.t_of_lam(sched.lam(t))
    assert torch.allclose(back, t, rtol=1e-10, atol=1e-12)
    # derivative of log alpha against a central difference
    h = 1e-6
    # mid-cell points, so the piecewise-linear discrete schedule is differentiable there
    tm = (torch.round(torch.linspace(0.05, 0.95, 17, dtype=torch.float64) * 1000) + 0.5) / 1000
    fd = (sched.log_alpha(tm + h) - sched.log_alpha(tm - h)) / (2 * h)
    assert torch.allclose(sched.d_log_alpha_dt(tm), fd, rtol=1e-5, atol=1e-7)


def test_float64_and_shapes():
    s = VPSchedule.linear()
    assert s.alpha(0.5).dtype == torch.float64 and s.alpha(0.5).shape == ()
    assert s.lam(torch.rand(3, 2)).shape == (3, 2)
    # no catastrophic cancellation near t = 0: sigma^2 ~ beta_min t
    assert float(s.sigma(1e-9)) ** 2 == pytest.approx(0.1e-9, rel=1e-6)


def test_round_trip_dict_and_errors():
    for s in (VPSchedule.linear(0.2, 10.0), VPSchedule.cosine(), VPSchedule.ddpm_linear(100)):
        assert VPSchedule.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSchedule.linear(5.0, 1.0)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        VPSchedule("sqrt", {})
    with pytest.raises(ValueError, match=r"must lie in \[1e-05, 1\]"):
        VPSchedule.linear().check_times([0.5, 1.5], "grid")
