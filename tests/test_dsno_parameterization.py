"""DSNO's output parameterisation, the matrix-form temporal layer, and the perceptual loss."""

import copy

import pytest
import torch

from dsno.errors import UserFileNotFoundError
from dsno.nn import DSNO, TemporalConv, build_dsno, set_temporal_impl, validate_config
from dsno.nn.parameterization import coefficients
from dsno.schedules import VPSchedule
from dsno.solvers import solve, timesteps
from dsno.teachers.base import convert

TIMES = [0.5625, 0.25, 0.0625, 0.001]


# ------------------------------------------------------------------ temporal layer: fft vs matmul

@pytest.mark.parametrize("num_times,modes", [(4, 2), (4, 3), (5, 3), (6, 2), (2, 1)])
def test_matmul_and_fft_temporal_layers_agree_in_output_and_gradient(num_times, modes):
    torch.manual_seed(0)
    layer = TemporalConv(channels=6, num_times=num_times, modes=modes)
    with torch.no_grad():
        layer.spectral.weight.tensor.copy_(0.3 * torch.randn(6, 6, modes, dtype=torch.cfloat))
    h = torch.randn(3 * num_times, 6, 4, 4)
    probe = torch.randn(3 * num_times, 6, 4, 4)
    results = {}
    for impl in ("fft", "matmul"):
        x = h.clone().requires_grad_(True)
        layer.zero_grad()
        set_temporal_impl(layer, impl)
        y = layer(x)
        (y * probe).sum().backward()
        results[impl] = (y.detach(), x.grad, layer.spectral.weight.tensor.grad.clone())
    (y_f, gx_f, gw_f), (y_m, gx_m, gw_m) = results["fft"], results["matmul"]
    assert (y_f - h).abs().max() > 0.1                      # the layer is not the identity here
    assert (y_f - y_m).abs().max() < 1e-5
    assert (gx_f - gx_m).abs().max() < 1e-5
    assert gw_f.abs().max() > 0.1 and (gw_f - gw_m).abs().max() < 1e-4 * gw_f.abs().max()


def test_set_temporal_impl_keeps_the_state_dict_and_rejects_unknown():
    model = build_dsno(_config())
    keys = set(model.state_dict())
    assert set_temporal_impl(model, "auto") == 8
    assert all(layer.impl == "matmul" for layer in model.temporal_layers())   # CPU: matmul
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="temporal impl"):
        set_temporal_impl(model, "cuda_graph")


# ------------------------------------------------------------------ build config

def _config(**overrides):
    base = {"format_version": 2, "backbone": {"type": "unet", "kwargs": {
        "in_channels": 1, "out_channels": 1, "image_size": 8, "base_channels": 8, "attn_resolutions": []}},
        "time_input": "continuous", "times": TIMES, "modes": 2, "skip": [0.1, 0.2, 0.3, 0.4],
        "state_shape": [1, 8, 8]}
    base.update(overrides)
    return base


def test_old_config_without_coefficients_keeps_the_old_forward():
    torch.manual_seed(0)
    model = build_dsno(_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 1, 8, 8)
    net = model.backbone(x.repeat_interleave(4, 0), torch.tensor(TIMES).repeat(3)).reshape(3, 4, 1, 8, 8)
    expected = torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(1, 4, 1, 1, 1) * x.unsqueeze(1) + net
    assert (model(x) - expected).abs().max() < 1e-5


def test_coefficients_in_the_config_drive_the_forward():
    torch.manual_seed(0)
    coef = {"out_scale": [2.0, 1.0, -1.0, 0.5], "in_scale": [0.5, 1.0, 1.5, 2.0], "net_times": [0.9, 0.7, 0.6, 0.5]}
    model = build_dsno(_config(**coef, parameterization={"kind": "denoised", "prediction": "eps"}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 8, 8)
    inputs = torch.tensor(coef["in_scale"]).reshape(1, 4, 1, 1, 1) * x.unsqueeze(1)
    net = model.backbone(inputs.reshape(8, 1, 8, 8), torch.tensor(coef["net_times"]).repeat(2)).reshape(2, 4, 1, 8, 8)
    expected = (torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(1, 4, 1, 1, 1) * x.unsqueeze(1)
                + torch.tensor(coef["out_scale"]).reshape(1, 4, 1, 1, 1) * net)
    assert (model(x) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("overrides,message", [
    ({"out_scale": [1.0]}, "out_scale.*one coefficient per time"),
    ({"in_scale": [1.0, 1.0, float("nan"), 1.0]}, "in_scale"),
    ({"net_times": [1.5, 0.5, 0.4, 0.3]}, "net_times"),
    ({"parameterization": {"kind": "flow"}}, "parameterization"),
])
def test_validate_config_rejects_bad_coefficients(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(_config(**overrides))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_denoised_coefficients_are_the_ddim_map_of_the_teachers_reading(prediction):
    """skip x_T + out F == (s_m/s_T) x_T + (a_m - a_T s_m/s_T) D, D = the x0 the teacher reads from F."""
    sched = VPSchedule.linear()
    c = coefficients(sched, TIMES, "denoised", prediction, 0.5, 0.5)
    x_T, f = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    tau = torch.tensor(c["net_times"], dtype=torch.float64)
    t = torch.tensor(TIMES, dtype=torch.float64)
    x_in = torch.tensor(c["in_scale"], dtype=torch.float64)[:, None] * x_T
    d = convert(f, x_in, sched.alpha(tau), sched.sigma(tau), prediction, "x0")
    k = sched.sigma(t) / sched.sigma(torch.tensor(1.0, dtype=torch.float64))
    ell = sched.alpha(t) - sched.alpha(torch.tensor(1.0, dtype=torch.float64)) * k
    expected = k[:, None] * x_T + ell[:, None] * d
    got = torch.tensor(c["skip"], dtype=torch.float64)[:, None] * x_T + torch.tensor(c["out_scale"], dtype=torch.float64)[:, None] * f
    assert (got - expected).abs().max() < 1e-9
    assert c["net_times"][0] > c["net_times"][-1] >= 0.5 and all(0 < s for s in c["in_scale"])


# ------------------------------------------------------------------ step 0 of a copied student

def _solve(teacher, x_T, steps):
    grid = timesteps(teacher.schedule, steps=steps, spacing="logsnr", t_end=TIMES[-1])
    with torch.no_grad():
        return solve(teacher, x_T, grid, solver="dpm_solver_pp", order=3).float()


class ExactNet(torch.nn.Module):
    """A teacher network of a given prediction kind: one residual unit (the identity at init, as in
    a UNet) followed by the exact denoiser of a two-component Gaussian mixture, read as `prediction`."""

    def __init__(self, prediction: str):
        super().__init__()
        from dsno.nn.unet import ResAttnBlock
        from dsno.teachers.gmm import GaussianMixture
        means = torch.full((2, 1, 8, 8), -0.8)
        means[0, :, 2:6, 3:5] = 0.8
        means[1, :, 3:5, 1:7] = 0.8
        self.mixture = GaussianMixture(means, torch.full((2, 1, 8, 8), 0.01), torch.tensor([0.4, 0.6]),
                                       VPSchedule.linear())
        self.prediction = prediction
        self.unit = ResAttnBlock(1, 1, 4, attention=False, num_groups=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.unit(x, torch.zeros(x.shape[0], 4))
        return self.mixture.predict(h.double(), t.double(), self.prediction).float()


def _final_rmses(network, sched, prediction, final, x_T):
    """(step-0 student, its own zero-output baseline, the Gaussian-skip baseline): RMSE to `final`."""
    coef = coefficients(sched, TIMES, "denoised", prediction, 0.5, 0.5)
    student = DSNO(copy.deepcopy(network), TIMES, 2, coef["skip"], out_scale=coef["out_scale"],
                   in_scale=coef["in_scale"], net_times=coef["net_times"])
    gaussian = coefficients(sched, TIMES, "state", sigma_data=0.5)["skip"][-1]
    with torch.no_grad():
        step0 = student(x_T)[:, -1]

    def rmse(x):
        return float((x - final).square().mean().sqrt())
    return rmse(step0), rmse(coef["skip"][-1] * x_T), rmse(gaussian * x_T)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_step0_student_of_every_teacher_kind_beats_its_zero_output_baselines(prediction):
    from dsno.teachers.base import WrappedTeacher
    net = ExactNet(prediction)
    teacher = WrappedTeacher(net, net.mixture.schedule, prediction)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    final = _solve(teacher, x_T, steps=40)
    step0, own_zero, gaussian_zero = _final_rmses(net, teacher.schedule, prediction, final, x_T)
    assert step0 < 0.6 * min(own_zero, gaussian_zero), (step0, own_zero, gaussian_zero)


def test_step0_student_of_the_shipped_unet_teacher_beats_the_baselines_and_the_old_head():
    """The shipped eps-prediction UNet: the old reading (skip + eps head as a state) was worse than zero output."""
    from dsno.teachers.unet import load_unet_teacher
    teacher = load_unet_teacher()
    x_T = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    final = _solve(teacher, x_T, steps=15)
    step0, own_zero, gaussian_zero = _final_rmses(teacher.network, teacher.schedule, "eps", final, x_T)
    assert step0 < 0.6 * min(own_zero, gaussian_zero), (step0, own_zero, gaussian_zero)
    skip = coefficients(teacher.schedule, TIMES, "state", sigma_data=0.5)["skip"]
    old = DSNO(copy.deepcopy(teacher.network), TIMES, 2, skip)
    with torch.no_grad():
        old_final = old(x_T)[:, -1]
    assert float((old_final - final).square().mean().sqrt()) > gaussian_zero > step0


# ------------------------------------------------------------------ perceptual loss

def _tiny_vgg_file(path):
    """Random weights in torchvision's VGG-16 key layout with narrow convolutions."""
    from dsno.training.perceptual import _CONVS
    g = torch.Generator().manual_seed(0)
    widths = [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]
    state, cin = {}, 3
    for i, w in zip(_CONVS, widths):
        state[f"features.{i}.weight"] = 0.3 * torch.randn(w, cin, 3, 3, generator=g)
        state[f"features.{i}.bias"] = 0.01 * torch.randn(w, generator=g)
        cin = w
    torch.save(state, path)
    return path


def test_perceptual_loss_refuses_a_missing_weights_file_in_one_line(tmp_path):
    from dsno.training.losses import build_loss
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(UserFileNotFoundError) as err:
        build_loss(torch.ones(4), "lpips", str(missing))
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and "vgg16-397923af.pth" in message


def test_perceptual_distance_on_small_random_weights(tmp_path):
    from dsno.training.losses import build_loss
    from dsno.training.perceptual import PerceptualDistance
    weights = _tiny_vgg_file(tmp_path / "vgg_tiny.pth")
    dist = PerceptualDistance(weights)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert dist(x, x).abs().max() < 1e-6
    d = dist(x, y)
    assert d.shape == (3,) and (d > 1e-3).all()
    assert dist(x[:, :1], y[:, :1]).shape == (3,)                     # 1-channel images are repeated to RGB
    loss = build_loss(torch.tensor([1.0, 2.0]), "lpips", str(weights))
    pred = y.reshape(3, 1, 3, 16, 16).repeat(1, 2, 1, 1, 1).requires_grad_(True)
    value, per_time = loss(pred, x.reshape(3, 1, 3, 16, 16).repeat(1, 2, 1, 1, 1))
    value.backward()
    assert torch.allclose(per_time, d.mean().repeat(2), atol=1e-5)
    assert pred.grad.abs().sum() > 0
    assert not any("perceptual" in k or "features" in k for k in loss.state_dict())


def test_perceptual_weights_must_be_plain_tensors(tmp_path):
    from dsno.training.perceptual import PerceptualDistance

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"features.0.weight": Evil()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        PerceptualDistance(bad)
