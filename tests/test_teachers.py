import pytest
import torch

from dsno import VPSchedule
from dsno.teachers import GaussianMixture, convert, wrap


def _mixture(k=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(k, d, generator=g), torch.rand(k, d, generator=g) + 0.05,
                           torch.rand(k, generator=g) + 0.2, schedule=VPSchedule.linear())


def test_mixture_score_matches_autograd_of_log_density():
    gmm = _mixture()
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1e-3, 0.01, 0.1, 0.2, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    grad, = torch.autograd.grad(gmm.log_prob(x, t).sum(), x)
    assert torch.allclose(gmm.score(x.detach(), t), grad, rtol=1e-10, atol=1e-10)


def test_mixture_denoiser_matches_monte_carlo_posterior_mean():
    # E[x0 | x_t] by self-normalised importance sampling from the prior
    gmm = _mixture(k=3, d=2, seed=1)
    t = 0.4
    g = torch.Generator().manual_seed(2)
    x0 = gmm.sample_data(400_000, g).to(torch.float64)
    a, s = float(gmm.schedule.alpha(t)), float(gmm.schedule.sigma(t))
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    logw = -0.5 * ((x - a * x0) ** 2).sum(-1) / s**2
    w = torch.softmax(logw, 0)
    mc = (w[:, None] * x0).sum(0)
    assert torch.allclose(gmm.x0(x, t)[0], mc, atol=0.01)


def test_single_gaussian_ode_solution_satisfies_the_ode():
    gmm = GaussianMixture(torch.tensor([[0.5, -1.0, 0.0]]), torch.tensor([[0.3, 1.5, 0.01]]),
                          schedule=VPSchedule.linear())
    x_T = torch.randn(5, 3, dtype=torch.float64)
    # PF-ODE: dx/dt = f x - (g^2 / 2) score, f = d log alpha / dt, g^2 = -2 f, score = -(x - alpha x0) / sigma^2
    t, h = 0.3, 1e-5
    xp = gmm.ode_solution(x_T, 1.0, t + h)
    xm = gmm.ode_solution(x_T, 1.0, t - h)
    xt = gmm.ode_solution(x_T, 1.0, t)
    f = float(gmm.schedule.d_log_alpha_dt(t))
    alpha, sig = float(gmm.schedule.alpha(t)), float(gmm.schedule.sigma(t))
    rhs = f * xt - f * (xt - alpha * gmm.x0(xt, t)) / sig**2
    assert torch.allclose((xp - xm) / (2 * h), rhs, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="single Gaussian"):
        _mixture().ode_solution(x_T[:, :2], 1.0, 0.5)


@pytest.mark.parametrize("src", ["eps", "x0", "v"])
def test_wrap_converts_between_parameterisations(src):
    gmm = _mixture()
    sched = gmm.schedule

    def model(x, t):
        return gmm.predict(x, t, src)

    teacher = wrap(model, sched, prediction=src)
    x = torch.randn(5, 6, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 5, dtype=torch.float64)
    for kind in ("eps", "x0", "v"):
        assert torch.allclose(teacher.predict(x, t, kind), gmm.predict(x, t, kind), rtol=1e-10, atol=1e-10)


def test_conversion_identities():
    x, x0, eps = torch.randn(3, 4, 4, dtype=torch.float64).unbind(0)
    a, s = torch.tensor([0.6] * 4, dtype=torch.float64), torch.tensor([0.8] * 4, dtype=torch.float64)
    xt = 0.6 * x0 + 0.8 * eps
    v = 0.6 * eps - 0.8 * x0
    assert torch.allclose(convert(v, xt, a, s, "v", "x0"), x0)
    assert torch.allclose(convert(x0, xt, a, s, "x0", "v"), v)
    assert torch.allclose(convert(eps, xt, a, s, "eps", "x0"), x0)


def test_discrete_time_wrap_passes_step_index():
    sched = VPSchedule.ddpm_linear(1000)
    seen = {}

    def model(x, t):
        seen["t"] = t
        return torch.zeros_like(x)

    teacher = wrap(model, sched, prediction="eps", time_input="discrete")
    teacher.eps(torch.zeros(2, 3), torch.tensor([1.0, 0.001]))
    assert torch.allclose(seen["t"].double(), torch.tensor([999.0, 0.0], dtype=torch.float64), atol=1e-4)
    with pytest.raises(ValueError, match="discrete schedule"):
        wrap(model, VPSchedule.linear(), time_input="discrete")
    with pytest.raises(ValueError, match="prediction must be one of"):
        wrap(model, sched, prediction="score")


def test_shipped_mnist_mixture_loads_and_is_reproducible_from_its_command():
    from dsno.teachers.mnist_gmm import fit_mnist_gmm, load_mnist_gmm
    gmm = load_mnist_gmm()
    assert gmm.shape == (1, 16, 16) and gmm.num_components == 64
    refit = fit_mnist_gmm(16, 64, seed=0, iters=100)
    assert torch.allclose(refit["means"].reshape(64, -1), gmm.means, atol=1e-6)
    assert torch.allclose(refit["weights"], gmm.log_weights.exp(), atol=1e-8)
