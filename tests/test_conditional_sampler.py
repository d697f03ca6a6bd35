"""Class-conditional students end to end: UNet labels, DSNO(x_T, labels), export of the three forms with a
labels input, loading, `Sampler.sample(labels=)` and `python -m dsno.sample_images labels=`."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dsno import export as export_module
from dsno.errors import UserError
from dsno.export import export_sampler, save_pt2
from dsno.inputs import InputError
from dsno.nn import UNet, build_dsno
from dsno.nn.config import ConfigError, SamplerConfig
from dsno.nn.dsno import student_from_teacher
from dsno.sample_images import chunk_seed, main as sample_images_main, to_pixels, write_samples
from dsno.sampler import SamplerFileError, load_sampler, read_config
from dsno.trust import write_checksums

K = 6
V1 = Path(__file__).parent / "data" / "sampler_v1"
UNET = {"in_channels": 1, "out_channels": 1, "base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
        "attn_resolutions": [], "image_size": 8, "num_groups": 4, "num_classes": K}
CONFIG = {"format_version": 2, "backbone": {"type": "unet", "kwargs": UNET}, "time_input": "continuous",
          "times": [0.5, 0.0], "modes": 2, "skip": [0.0, 0.5], "state_shape": [1, 8, 8],
          "data_range": [-1.0, 1.0], "num_classes": K}


def randomise(module: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Every weight random (the zero-initialised output layers included), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module.eval()


def noise(batch: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return randomise(build_dsno(CONFIG))


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    return export_sampler(model, CONFIG, tmp_path_factory.mktemp("run") / "sampler")


def one_line_error(call, error=InputError) -> str:
    with pytest.raises(error) as e:
        call()
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    return str(e.value)


# --- the network ---------------------------------------------------------------------------------

def test_unet_labels_change_the_output_and_null_rows_equal_no_labels():
    net = randomise(UNet(**UNET))
    x, t = noise(4).repeat(2, 1, 1, 1), torch.full((8,), 0.3)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    with torch.no_grad():
        out = net(x, t, labels)
        null = net(x, t, torch.full((8,), K))
        unlabelled = net(x, t)
    assert (out[:4] - out[4:]).abs().amax(dim=(1, 2, 3)).min() > 1e-2     # same x, another label: another output
    assert torch.allclose(out[0], net(x[:1], t[:1], labels[:1])[0], atol=1e-6)     # rows are independent
    assert torch.equal(null, unlabelled) and (null - out).abs().max() > 1e-2
    with pytest.raises(ValueError, match="unconditional"):
        randomise(UNet(**{**UNET, "num_classes": None}))(x, t, labels)


def test_dsno_branch_m_is_the_backbone_at_its_scaled_input_time_and_labels():
    backbone = randomise(UNet(**UNET), seed=1)
    coefficients = {"skip": [0.25, 0.5], "out_scale": [0.7, 1.3], "in_scale": [0.6, 1.1], "net_times": [0.8, 0.05]}
    student = student_from_teacher(backbone, [0.5, 0.0], 2, **coefficients).eval()
    x, labels = noise(3), torch.tensor([5, 0, 2])
    with torch.no_grad():
        out = student(x, labels)
        for m in range(2):
            net = backbone(coefficients["in_scale"][m] * x, torch.full((3,), coefficients["net_times"][m]), labels)
            expected = coefficients["skip"][m] * x + coefficients["out_scale"][m] * net
            assert (out[:, m] - expected).abs().max() <= 1e-5
        assert (student(x, torch.tensor([1, 3, 4])) - out).abs().max() > 1e-2


def test_config_num_classes_must_match_the_backbone_and_v1_still_loads(tmp_path):
    for backbone_classes, classes in ((K, K + 1), (None, K), (K, None)):
        bad = {**CONFIG, "backbone": {"type": "unet", "kwargs": {**UNET, "num_classes": backbone_classes}}}
        if classes is None:
            del bad["num_classes"]
        else:
            bad["num_classes"] = classes
        message = one_line_error(lambda: SamplerConfig.from_dict(bad), ConfigError)
        assert "does not match the backbone" in message
    assert SamplerConfig.from_dict({**CONFIG, "num_classes": K - 1}).num_classes == K - 1   # a subset embeds
    shutil.copytree(V1, tmp_path / "v1")
    assert read_config(tmp_path / "v1").num_classes is None
    sampler = load_sampler(tmp_path / "v1")
    assert sampler.num_classes is None and sampler.sample(2, seed=0).abs().mean() > 0.05
    assert "unconditional and takes no class labels: drop labels" in one_line_error(
        lambda: sampler.sample(2, seed=0, labels=1))


# --- export and loading --------------------------------------------------------------------------

def test_three_forms_take_labels_and_give_the_same_images(model, folder):
    x, labels = noise(5), torch.tensor([0, 5, 2, 2, 3])
    with torch.no_grad():
        expected = model(x, labels)
    assert expected.abs().max() > 0.1
    for form in ("safetensors", "pt2", "onnx"):
        sampler = load_sampler(folder, form=form)
        assert sampler.form == form and sampler.num_classes == K
        out = sampler(x, labels)
        assert out.shape == (5, 2, 1, 8, 8) and (out - expected).abs().max() <= 1e-4, form
        other = sampler(x, torch.tensor([1, 4, 3, 0, 5]))
        assert (other - out).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-2, form   # every row follows its label
    import onnxruntime as ort
    inputs = ort.InferenceSession(str(folder / "sampler.onnx")).get_inputs()
    assert [(i.name, i.type, i.shape) for i in inputs] == [("x_T", "tensor(float)", ["batch", 1, 8, 8]),
                                                          ("labels", "tensor(int64)", ["batch"])]
    assert load_sampler(folder, form="onnx").label_input_name == "labels"


def test_export_verification_runs_every_form_on_the_same_labels(model, folder):
    config = SamplerConfig.from_dict(CONFIG)
    x_T, labels = export_module.example_inputs(config, 3, seed=1)
    assert x_T.shape == (3, 1, 8, 8) and labels.dtype == torch.int64 and labels.ne(0).any()

    class IgnoresLabels(nn.Module):
        def forward(self, x_T, labels):
            return model(x_T, torch.zeros_like(labels))

    for form in ("pt2", "onnx"):       # the export of `folder` passed the same check with the model itself
        with pytest.raises(RuntimeError, match=f"exported form '{form}' differs from the model"):
            export_module._verify(IgnoresLabels(), folder, [form], config)


def test_sample_takes_an_int_or_n_labels(folder):
    sampler = load_sampler(folder, form="pt2")
    threes = sampler.sample(4, seed=7, labels=3)
    assert torch.equal(threes, sampler.sample(4, seed=7, labels=[3, 3, 3, 3]))
    fives = sampler.sample(4, seed=7, labels=torch.tensor([5, 5, 5, 5]))
    assert (threes - fives).abs().amax(dim=(1, 2, 3)).min() > 1e-2
    mixed = sampler.sample(4, seed=7, labels=[3, 5, 3, 5], batch_size=3)    # labels follow their images
    assert torch.allclose(mixed[0::2], threes[0::2], atol=1e-5) and torch.allclose(mixed[1::2], fives[1::2], atol=1e-5)
    assert torch.equal(sampler.sample(0, labels=3), torch.zeros(0, 1, 8, 8))
    x = noise(3)
    assert torch.equal(sampler(x, 4), sampler(x, torch.tensor([4, 4, 4])))     # an int labels every row


@pytest.mark.parametrize("call,message", [
    (lambda s: s.sample(3), r"class-conditional \(6 classes\): pass labels"),
    (lambda s: s(noise(3)), r"class-conditional \(6 classes\): pass labels"),
    (lambda s: s.sample(3, labels=6), r"holds label 6, outside \[0, 6\)"),
    (lambda s: s.sample(3, labels=[0, -1, 2]), r"holds label -1, outside \[0, 6\)"),
    (lambda s: s.sample(3, labels=[0, 1]), r"with 3 labels \(one per sample\), got shape \(2,\)"),
    (lambda s: s(noise(3), torch.tensor([0, 1, 2, 3])), r"with 3 labels \(one per sample\), got shape \(4,\)"),
    (lambda s: s.sample(3, labels=[0.0, 1.0, 2.0]), "got dtype torch.float32"),
    (lambda s: s.sample(3, labels=2.0), "got dtype torch.float32"),
    (lambda s: s.sample(3, labels=True), "got dtype torch.bool"),
], ids=["missing", "missing-call", "int-range", "negative", "length", "call-length", "float", "float-int", "bool"])
def test_bad_labels_are_refused_in_one_line(folder, call, message):
    sampler = load_sampler(folder, form="safetensors")
    assert __import__("re").search(message, one_line_error(lambda: call(sampler)))


def _resign(folder: Path) -> None:
    write_checksums(folder, [p.name for p in folder.iterdir() if p.name != "checksums.json"])


def test_a_program_whose_inputs_do_not_match_its_config_is_refused_in_one_line(folder, tmp_path):
    unconditional = tmp_path / "unconditional-config"
    shutil.copytree(folder, unconditional)
    config = json.loads((unconditional / "config.json").read_text())
    del config["num_classes"], config["backbone"]["kwargs"]["num_classes"]
    (unconditional / "config.json").write_text(json.dumps(config))
    _resign(unconditional)
    for form in ("pt2", "onnx"):
        message = one_line_error(lambda: load_sampler(unconditional, form=form), SamplerFileError)
        assert f"sampler.{form} takes 2 input(s), but its config.json declares an unconditional sampler" in message

    class FloatLabels(nn.Module):   # two inputs, but the labels are not int64 [B]
        def forward(self, x_T, labels):
            return torch.stack([x_T, x_T * labels[:, None, None, None]], dim=1)

    float_labels = tmp_path / "float-labels"
    shutil.copytree(folder, float_labels)
    torch.onnx.export(FloatLabels(), (noise(2), torch.ones(2)), str(float_labels / "sampler.onnx"), dynamo=False,
                      input_names=["x_T", "labels"], output_names=["trajectory"],
                      dynamic_axes={"x_T": {0: "batch"}, "labels": {0: "batch"}, "trajectory": {0: "batch"}})
    _resign(float_labels)
    assert "sampler.onnx must take x_T [B, 1, 8, 8] and labels [B] int64 (6 classes) and return" in one_line_error(
        lambda: load_sampler(float_labels, form="onnx"), SamplerFileError)

    class OneInput(nn.Module):      # an unconditional program beside a conditional config
        def forward(self, x_T):
            return torch.stack([x_T, 0.5 * x_T], dim=1)

    conditional = tmp_path / "conditional-config"
    shutil.copytree(folder, conditional)
    x = noise(2)
    program = torch.export.export(OneInput(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    save_pt2(program, conditional / "sampler.pt2")
    torch.onnx.export(OneInput(), (x,), str(conditional / "sampler.onnx"), dynamo=False, input_names=["x_T"],
                      output_names=["trajectory"], dynamic_axes={"x_T": {0: "batch"}, "trajectory": {0: "batch"}})
    _resign(conditional)
    for form in ("pt2", "onnx"):
        message = one_line_error(lambda: load_sampler(conditional, form=form), SamplerFileError)
        assert (f"sampler.{form} takes 1 input(s), but its config.json declares a class-conditional sampler, which "
                f"takes x_T [B, 1, 8, 8] and labels [B] int64 (6 classes)") in message


# --- python -m dsno.sample_images labels= --------------------------------------------------------

def test_sample_images_cycles_the_labels_and_records_them(folder, tmp_path):
    out = tmp_path / "out"
    npz = write_samples(folder, 7, out, seed=2, batch_size=2, chunk_size=4, progress=False, labels="all")
    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5, 0]
    record = json.loads((out / "run.json").read_text())
    assert record["labels"] == list(range(K)) and "i % 6" in record["label_rule"]
    sampler = load_sampler(folder)
    images = np.load(npz)["samples"]
    expected = [to_pixels(sampler.sample(4, seed=chunk_seed(2, 0), labels=[0, 1, 2, 3]), sampler.data_range),
                to_pixels(sampler.sample(3, seed=chunk_seed(2, 1), labels=[4, 5, 0]), sampler.data_range)]
    assert np.array_equal(images, np.concatenate(expected))
    listed = tmp_path / "listed"
    write_samples(folder, 5, listed, seed=2, chunk_size=4, progress=False, labels=[4, 1])
    assert np.load(listed / "labels.npy").tolist() == [4, 1, 4, 1, 4]
    write_samples(folder, 3, tmp_path / "one", seed=2, progress=False, labels=np.int64(5))
    assert np.load(tmp_path / "one" / "labels.npy").tolist() == [5, 5, 5]
    assert "different labels" in one_line_error(
        lambda: write_samples(folder, 7, out, seed=2, chunk_size=4, progress=False, labels=[1]), UserError)


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        sample_images_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_sample_images_label_errors_are_one_line(folder, tmp_path, capsys):
    out = f"out={tmp_path / 'o'}"
    for labels, message in ((None, "is class-conditional (6 classes): pass labels=K"),
                            ("labels=6", "holds label 6, outside [0, 6)"),
                            ("labels=[1,x]", "need integer classes in [0, 6)"),
                            ("labels=[]", "need integer classes in [0, 6)"),
                            ("labels=2.5", "need integer classes in [0, 6)")):
        argv = [f"sampler={folder}", "n=3", out] + ([labels] if labels else [])
        assert message in _cli_error(capsys, argv)
    shutil.copytree(V1, tmp_path / "v1")
    assert "is unconditional and takes no class labels: drop labels=3" in _cli_error(
        capsys, [f"sampler={tmp_path / 'v1'}", "n=3", out, "labels=3"])
    assert not (tmp_path / "o").exists()
    sample_images_main([f"sampler={folder}", "n=3", out, "labels=[2,0]"])
    assert "o/labels.npy (each image's class)" in capsys.readouterr().out
    assert np.load(tmp_path / "o" / "labels.npy").tolist() == [2, 0, 2]
