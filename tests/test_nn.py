"""dsno.nn: UNet backbone, temporal Fourier layer, DSNO operator, student init, build config."""

import copy

import pytest
import torch
from torch.nn import functional as F

from dsno.nn import (
    DSNO,
    DiffusersUNet,
    DiscreteTime,
    TemporalConv,
    TemporalMatmul,
    UNet,
    build_dsno,
    diffusers_backbone_spec,
    load_backbone_weights,
    student_from_teacher,
)

TIMES = [0.5625, 0.25, 0.0625, 0.0]
UNET_KWARGS = dict(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), image_size=8, num_groups=4)



def randomize_(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with noise (the zero-initialised output layers make outputs 0 otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return randomize_(UNet(**UNET_KWARGS), seed=seed).eval()


def tiny_diffusers_unet(seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return randomize_(unet, std=0.1, seed=seed).eval()


def fft_reference(layer: TemporalConv, h: torch.Tensor) -> torch.Tensor:
    """out = u + LeakyReLU(IRFFT_M(R * RFFT_M(u)[:k])), written directly with torch.fft."""
    m, k = layer.num_times, layer.modes
    b = h.shape[0] // m
    u = h.reshape(b, m, *h.shape[1:])                                         # [B, M, C, H, W]
    spec = torch.fft.rfft(u, dim=1, norm="forward")[:, :k]                    # [B, k, C, H, W]
    mixed = torch.einsum("bkihw,iok->bkohw", spec, layer.weight)
    y = torch.fft.irfft(mixed, n=m, dim=1, norm="forward")
    return h + F.leaky_relu(y, 0.01).reshape(h.shape)


# ---------------------------------------------------------------------------------------------
# UNet


def test_unet_default_size_shape_and_time_dependence():
    unet = UNet()
    params = sum(p.numel() for p in unet.parameters())
    assert 300_000 <= params <= 800_000, params
    small = tiny_unet()
    x = torch.randn(3, 1, 8, 8)
    a, b = small(x, torch.full((3,), 0.2)), small(x, torch.full((3,), 0.7))
    assert a.shape == (3, 1, 8, 8)
    assert (a - b).abs().max() > 1e-3
    assert torch.allclose(small(x, torch.tensor(0.2)), a)  # a scalar t broadcasts


def test_unet_zero_initialised_output():
    torch.manual_seed(0)
    unet = UNet(**UNET_KWARGS)
    assert unet(torch.randn(2, 1, 8, 8), torch.rand(2)).abs().max() == 0.0


# ---------------------------------------------------------------------------------------------
# temporal layer


def test_temporal_identity_at_init_and_gradients_flow():
    torch.manual_seed(0)
    layer = TemporalConv(channels=6, num_times=4, modes=2)
    h = torch.randn(3 * 4, 6, 5, 5, requires_grad=True)
    out = layer(h)
    assert (out - h).abs().max() <= 1e-6
    (out * torch.randn_like(out)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().min() > 0
    assert h.grad is not None and h.grad.abs().max() > 0


@pytest.mark.parametrize("num_times,modes", [(4, 2), (4, 3), (5, 3), (1, 1)])
def test_temporal_matches_direct_fft_and_real_matrix_form(num_times, modes):
    torch.manual_seed(1)
    layer = TemporalConv(channels=3, num_times=num_times, modes=modes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, dtype=torch.cfloat))
    h = torch.randn(2 * num_times, 3, 4, 4)
    expected = fft_reference(layer, h)
    assert (layer(h) - expected).abs().max() < 1e-5
    assert (TemporalMatmul.from_temporal(layer)(h) - expected).abs().max() < 1e-5
    assert (layer(h) - h).abs().max() > 0.1


def test_temporal_mixes_branches_of_one_image_only():
    torch.manual_seed(2)
    layer = TemporalConv(channels=2, num_times=4, modes=2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, dtype=torch.cfloat))
    h = torch.randn(8, 2, 3, 3)
    perturbed = h.clone()
    perturbed[5] += 1.0  # image 1, branch 1
    diff = (layer(perturbed) - layer(h)).abs().amax(dim=(1, 2, 3))
    assert diff[:4].max() == 0 and diff[4:].min() > 0


def test_temporal_runs_in_float32_under_autocast():
    torch.manual_seed(3)
    layer = TemporalConv(channels=4, num_times=4, modes=2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, dtype=torch.cfloat))
    seen = []
    layer.spectral.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    h = torch.randn(8, 4, 3, 3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(h)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    expected = fft_reference(layer, h.float())
    assert torch.allclose(out.float(), expected, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding of the fp32 result


@pytest.mark.parametrize("num_times,modes", [(4, 0), (4, 4), (2, 3)])
def test_temporal_rejects_bad_modes(num_times, modes):
    with pytest.raises(ValueError, match="modes must lie in"):
        TemporalConv(4, num_times, modes)


# ---------------------------------------------------------------------------------------------
# DSNO operator


def test_dsno_branches_equal_backbone_at_each_time():
    backbone = tiny_unet()
    reference = copy.deepcopy(backbone)
    skip = [0.5, 0.25, 0.125, 0.0]
    model = DSNO(backbone, TIMES, modes=2, skip=skip).eval()
    assert len(model.temporal_layers()) == 8  # 2 down, 2 middle, 4 up; none after resampling
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 4, 1, 8, 8)
        for m, t in enumerate(TIMES):
            expected = skip[m] * x + reference(x, torch.full((3,), t))
            assert (out[:, m] - expected).abs().max() < 1e-5
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3


def test_dsno_with_diffusers_unet2d_branches_equal_unet():
    unet = tiny_diffusers_unet()
    reference = copy.deepcopy(unet)
    model = DSNO(DiffusersUNet(unet), TIMES[:3] + [0.001], modes=2, time_input=DiscreteTime(1000)).eval()
    assert model.unit_names == [
        "unet.down_blocks.0.resnets.0", "unet.down_blocks.1.attentions.0",
        "unet.up_blocks.0.attentions.0", "unet.up_blocks.0.attentions.1",
        "unet.up_blocks.1.resnets.0", "unet.up_blocks.1.resnets.1",
        "unet.mid_block.attentions.0", "unet.mid_block.resnets.1",
    ]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
        for m, t in enumerate(model.times.tolist()):
            expected = reference(x, torch.full((2,), t * 1000 - 1.0)).sample
            assert (out[:, m] - expected).abs().max() < 1e-4
    assert out.abs().max() > 1e-2


def test_student_from_teacher_copies_weights_and_matches_teacher():
    teacher = tiny_unet(seed=5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, TIMES, modes=2).eval()
    student_state = student.backbone.state_dict()
    for key, value in before.items():
        unit_key = next((k for k in student_state if k.replace(".unit.", ".") == key), None)
        assert unit_key is not None, key
        assert torch.equal(student_state[unit_key], value)
        assert torch.equal(teacher.state_dict()[key], value)  # the teacher is left alone
    assert not any(isinstance(mod, TemporalConv) for mod in teacher.modules())
    with torch.no_grad():
        student.backbone.conv_in.weight.add_(1.0)
    assert torch.equal(teacher.conv_in.weight, before["conv_in.weight"])
    x = torch.randn(2, 1, 8, 8)
    fresh = student_from_teacher(teacher, TIMES, modes=2).eval()
    with torch.no_grad():
        out = fresh(x)
        for m, t in enumerate(TIMES):
            assert (out[:, m] - teacher(x, torch.full((2,), t))).abs().max() < 1e-5


def test_load_backbone_weights_into_a_built_dsno():
    teacher = tiny_unet(seed=6)
    model = build_dsno(config(skip=None))
    load_backbone_weights(model, teacher)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = model.eval()(x)
        for m, t in enumerate(TIMES):
            assert (out[:, m] - teacher(x, torch.full((2,), t))).abs().max() < 1e-5
    other = UNet(**{**UNET_KWARGS, "out_channels": 2})
    with pytest.raises(ValueError, match=r"conv_out.bias: \(2,\) vs \(1,\)"):
        load_backbone_weights(model, other)


def test_load_backbone_weights_from_a_bare_diffusers_unet():
    unet = tiny_diffusers_unet(seed=2)
    cfg = config(backbone=diffusers_backbone_spec(unet), time_input={"discrete": 1000}, state_shape=[3, 8, 8],
                 skip=None)
    model = build_dsno(cfg).eval()
    load_backbone_weights(model, unet)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
        expected = unet(x, torch.full((2,), TIMES[1] * 1000 - 1.0)).sample
    assert (out[:, 1] - expected).abs().max() < 1e-4 and expected.abs().max() > 1e-2


def test_gradients_reach_every_temporal_weight_and_parameter_groups():
    model = DSNO(tiny_unet(), TIMES, modes=2)
    x = torch.randn(2, 1, 8, 8)
    (model(x) * torch.randn(2, 4, 1, 8, 8)).sum().backward()
    temporal = list(model.temporal_parameters())
    assert len(temporal) == 8
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in temporal)
    expected = sum(layer.channels ** 2 * layer.modes for layer in model.temporal_layers())
    assert sum(p.numel() for p in temporal) == expected
    assert len(list(model.backbone_parameters())) + len(temporal) == len(list(model.parameters()))


def test_exportable_copy_is_numerically_the_same():
    model = DSNO(tiny_unet(), TIMES, modes=2, skip=[0.1, 0.2, 0.3, 1.0]).eval()
    randomize_(model, std=0.1, seed=7)
    exportable = model.exportable()
    assert not any(isinstance(mod, TemporalConv) for mod in exportable.modules())
    assert sum(isinstance(mod, TemporalMatmul) for mod in exportable.modules()) == 8
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert (exportable(x) - model(x)).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# build config


def config(**overrides):
    base = {"format_version": 2, "backbone": {"type": "unet", "kwargs": dict(UNET_KWARGS)},
            "time_input": "continuous", "times": TIMES, "modes": 2, "skip": [0.0, 0.0, 0.0, 1.0],
            "state_shape": [1, 8, 8], "data_range": [-1, 1], "schedule": {"kind": "linear"}}
    base.update(overrides)
    return base


def test_build_dsno_from_config():
    model = build_dsno(config())
    assert model.times.tolist() == TIMES and model.skip.tolist() == [0.0, 0.0, 0.0, 1.0]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out[:, 3], x)  # zero-initialised backbone output + skip 1 at the last time
    diffusers_cfg = config(backbone={"type": "diffusers_unet2d", "config": {
        "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 32],
        "layers_per_block": 1, "norm_num_groups": 8, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}}, time_input={"discrete": 1000})
    model = build_dsno(diffusers_cfg)
    assert isinstance(model.backbone, DiffusersUNet) and model.time_input.num_steps == 1000
    assert model(x).shape == (2, 4, 1, 8, 8)


def test_an_augmented_student_emits_the_data_part_and_skips_from_its_noise():
    """A backbone taking the 2 channels of (x, m) and emitting 1 (data_channels): the output is the data
    part of each state, and the skip reads x_T's leading (data) channels."""
    kwargs = {**UNET_KWARGS, "in_channels": 2, "out_channels": 1}
    cfg = config(backbone={"type": "unet", "kwargs": kwargs}, state_shape=[2, 8, 8], data_channels=1,
                 skip=[0.5, 0.25, 0.125, 0.0])
    model = build_dsno(cfg).eval()
    reference = randomize_(UNet(**kwargs), seed=3).eval()
    load_backbone_weights(model, reference)
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 4, 1, 8, 8)
        for m, t in enumerate(TIMES):
            expected = cfg["skip"][m] * x[:, :1] + reference(x, torch.full((3,), t))
            assert float((out[:, m] - expected).abs().max()) < 1e-5
    from dsno.nn.dsno import output_channels
    assert output_channels(cfg) == 1 and output_channels(config()) == 1
    with pytest.raises(ValueError, match=r"emit C or data_channels \(1\)"):
        build_dsno(config(backbone={"type": "unet", "kwargs": {**kwargs, "out_channels": 3}}, state_shape=[2, 8, 8],
                          data_channels=1))


@pytest.mark.parametrize("overrides,message", [
    ({"backbone": {"type": "resnet"}}, "backbone']\\['type'\\] must be"),
    ({"state_shape": [3, 8, 8]}, "does not match the backbone"),
    ({"times": [0.1, 0.5]}, "strictly decreasing"),
    ({"modes": 4}, "modes must lie in"),
    ({"skip": [0.0]}, "one coefficient per time"),
    ({"time_input": "discrete"}, "time_input"),
    ({"format_version": 3}, "newer dsno"),
])
def test_build_dsno_rejects_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_dsno(config(**overrides))
