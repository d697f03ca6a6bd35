"""The build config is one typed, bounded object; files from disk are bounded before they are parsed;
the public API names a wrong argument in one line.

tests/data/sampler_v1 is a sampler folder exported by dsno at main 96e9fd2 (format_version 1, safetensors
form); tests/data/sampler_v1_expected.json holds what that dsno's loader sampled from it.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsno
from dsno.data.manifest import DatasetError, load_manifest
from dsno.data.verify import VerifiedCache
from dsno.inputs import InputError
from dsno.jsonfile import MAX_DEPTH
from dsno.nn import SamplerConfig, build_dsno
from dsno.nn.config import ConfigError
from dsno.sampler import SamplerFileError, load_sampler, read_config
from dsno.trust import TamperedFileError, write_checksums

DATA = Path(__file__).parent / "data"
V1 = DATA / "sampler_v1"


def _copy(tmp_path, edit=None, name="s"):
    """A copy of the v1 folder, its config.json edited by `edit(dict)` and the folder signed again
    (as a user can sign their own folder): only the schema stands between the config and the tensors."""
    folder = tmp_path / name
    shutil.copytree(V1, folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        write_checksums(folder, ["config.json", "weights.safetensors"])
    return folder


def test_a_sampler_folder_exported_by_format_version_1_still_loads(tmp_path):
    sampler = load_sampler(_copy(tmp_path))
    expected = torch.tensor(json.loads((DATA / "sampler_v1_expected.json").read_text())["sample_n2_seed0"])
    assert sampler.times == [0.5, 0.1, 0.001] and sampler.state_shape == (1, 8, 8)
    assert torch.allclose(sampler.sample(2, seed=0), expected, atol=1e-6)
    assert float(expected.abs().mean()) > 0.05        # the weights are not at their (zero) init


def test_an_old_config_with_only_the_required_keys_builds_with_the_defaults():
    old = {"format_version": 1, "times": [0.5, 0.1], "modes": 1, "image_shape": [1, 8, 8],
           "backbone": {"type": "unet", "kwargs": {"in_channels": 1, "out_channels": 1, "image_size": 8,
                                                   "base_channels": 8, "channel_mult": [1], "attn_resolutions": []}}}
    config = SamplerConfig.from_dict(old)
    assert config.data_range == (-1.0, 1.0) and config.time_input == "continuous" and config.skip is None
    assert config.times == (0.5, 0.1) and config.state_shape == (1, 8, 8) and config.output_channels == 1
    assert SamplerConfig.from_dict(config.to_dict()) == config
    model = build_dsno(old)
    assert model.skip.tolist() == [0.0, 0.0] and model.net_times.tolist() == pytest.approx([0.5, 0.1])


def test_format_version_1_image_shape_is_read_as_state_shape_and_refused_in_a_current_config(tmp_path):
    v1 = json.loads((V1 / "config.json").read_text())
    assert v1["format_version"] == 1 and v1["image_shape"] == [1, 8, 8]
    config = SamplerConfig.from_dict(v1)
    assert config.state_shape == (1, 8, 8) and config.format_version == 2
    written = config.to_dict()
    assert written["state_shape"] == [1, 8, 8] and "image_shape" not in written and written["format_version"] == 2
    assert SamplerConfig.from_dict(written) == config
    current = {**v1, "format_version": 2}
    with pytest.raises(ConfigError, match=r"^config: key 'image_shape' is named 'state_shape' since format_version 2; "
                                          r"rename it 'state_shape'$"):
        SamplerConfig.from_dict(current)
    with pytest.raises(ConfigError, match=r"key 'image_shape' is named 'state_shape'"):
        SamplerConfig.from_dict({**v1, "state_shape": [1, 8, 8]})      # both names: which one is meant?
    folder = _copy(tmp_path, lambda c: c.update(format_version=2))
    with pytest.raises(SamplerFileError, match=r"config.json: .*key 'image_shape' is named 'state_shape'") as err:
        load_sampler(folder)
    assert "\n" not in str(err.value)


def test_a_config_of_a_newer_dsno_says_so_before_naming_its_new_keys():
    config = json.loads((V1 / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"format_version 3: written by a newer dsno; upgrade"):
        SamplerConfig.from_dict({**config, "format_version": 3, "guidance": {"scale": 2.0}})


def _kwargs(**change):
    def edit(config):
        config["backbone"]["kwargs"].update(change)
    return edit


def _image(side):
    def edit(config):
        config["backbone"]["kwargs"]["image_size"] = side
        config["image_shape"] = [1, side, side]
    return edit


@pytest.mark.parametrize("edit,message", [
    (_image(65536), r"\['image_size'\] must be an integer in \[1, 2,048\], got 65536"),
    (_kwargs(in_channels=-1), r"\['in_channels'\] must be an integer in \[1, 64\], got -1"),
    (_kwargs(base_channels=200000), r"\['base_channels'\] must be an integer in \[1, 8,192\], got 200000"),
    (_kwargs(widht=3), r"unknown UNet arguments \['widht'\]"),
    (lambda c: c.update(modes="two"), r"modes must lie in \[1, num_times // 2 \+ 1\] = \[1, 2\] .*got 'two'"),
    (lambda c: c.update(data_range=["a", "b"]), r"data_range'\] lo must be a finite number"),
    (lambda c: c.update(time_input={"discrete": 10**10}), r"\['discrete'\] must be an integer in \[1, 100,000\]"),
    (lambda c: c.update(times=[1.0 - i / 5000 for i in range(5000)]), r"times must be a non-empty list of at most"),
    (lambda c: c.update(image_shape=[64, 2048, 2048]), r"state_shape'\] \[64, 2048, 2048\] has more than"),
    (lambda c: c.update(surprise=1), r"config has unknown keys \['surprise'\]"),
])
def test_a_config_out_of_bounds_is_one_line_naming_the_file_and_key(tmp_path, edit, message):
    folder = _copy(tmp_path, edit)
    with pytest.raises(SamplerFileError, match=rf"config.json: .*{message}") as err:
        load_sampler(folder)
    assert "\n" not in str(err.value) and "python -m dsno.export" in str(err.value)


def test_a_config_that_is_a_link_to_another_file_is_refused_unread(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"format_version": 1, "backbone": {"type": "unet"}, "times": [0.5], "modes": 1,
                                  "image_shape": "TOPSECRET"}))
    folder = _copy(tmp_path)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(secret)
    with pytest.raises(TamperedFileError, match=r"config.json is missing or not a regular file") as err:
        load_sampler(folder)
    assert "TOPSECRET" not in str(err.value)
    with pytest.raises(SamplerFileError, match=r"config.json is a symbolic link") as err:
        read_config(folder)                     # the reader alone refuses it too (export's run_dir, eval)
    assert "TOPSECRET" not in str(err.value)


def test_weights_of_the_right_shapes_but_integer_dtype_are_refused(tmp_path):
    folder = _copy(tmp_path)
    state = load_file(str(folder / "weights.safetensors"))
    save_file({k: v.to(torch.int8) for k, v in state.items()}, str(folder / "weights.safetensors"))
    write_checksums(folder, ["config.json", "weights.safetensors"])
    with pytest.raises(SamplerFileError, match=r"weights.safetensors holds I8 tensors where the model has floats"):
        load_sampler(folder)


def test_deep_or_huge_json_files_are_refused_before_parsing(tmp_path):
    folder = _copy(tmp_path)
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    write_checksums(folder, ["config.json", "weights.safetensors"])
    with pytest.raises(SamplerFileError, match=rf"config.json nests deeper than {MAX_DEPTH} levels"):
        load_sampler(folder)
    (folder / "checksums.json").write_text('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(TamperedFileError, match=r"checksums.json nests deeper than"):
        load_sampler(folder)
    sparse = tmp_path / "data" / "manifest.json"
    sparse.parent.mkdir()
    with open(sparse, "wb") as f:
        f.truncate(20 << 30)                                  # 20 GB, no disk used
    with pytest.raises(DatasetError, match=r"manifest.json is 21,474,836,480 bytes, more than the"):
        load_manifest(sparse.parent)


def test_json_files_of_the_wrong_shape_are_one_line_naming_them(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    manifest = {"format_version": 1, "fingerprint": {}, "seed": 0, "num_trajectories": 2, "shard_size": 2,
                "shards": 5}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"manifest.json: 'shards' must be a list of shard records, not a JSON int"):
        load_manifest(folder)
    (folder / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"manifest.json must hold a JSON object, not a JSON array"):
        load_manifest(folder)
    (folder / "verified.json").write_text("[" * 200_000 + "]" * 200_000)
    assert not VerifiedCache(folder).holds("shard_00000_states.npy", [1])    # a damaged cache is only a cache

    from dsno.sample_images import write_samples
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("[]")
    with pytest.raises(dsno.errors.UserError, match=r"run.json must hold a JSON object, not a JSON array"):
        write_samples(_copy(tmp_path), 2, out, progress=False)


def _teacher_file(tmp_path, edit_record=None, dtype=None):
    from dsno.teachers.unet import RECORD_KEY, asset_path
    source = asset_path(16)
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
    record = json.loads(meta[RECORD_KEY])
    if edit_record is not None:
        edit_record(record)
    state = load_file(str(source))
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.to(dtype) if dtype else v for k, v in state.items()}, str(path),
              metadata={**meta, RECORD_KEY: json.dumps(record)})
    return path


def test_teacher_records_and_weights_are_bounded_and_typed(tmp_path):
    from dsno.teachers.unet import load_unet_teacher
    wide = _teacher_file(tmp_path, lambda r: r["backbone"]["kwargs"].update(base_channels=200000))
    with pytest.raises(ConfigError, match=r"teacher.safetensors: metadata 'dsno_teacher' backbone "
                                          r"kwargs\['base_channels'\] must be an integer in \[1, 8,192\]"):
        load_unet_teacher(wide)
    deep = _teacher_file(tmp_path, lambda r: r.update(notes=json.loads("[" * 60 + "]" * 60)))
    assert load_unet_teacher(deep).shape == (1, 16, 16)        # deep but within bounds: loads
    int8 = _teacher_file(tmp_path, dtype=torch.int8)
    with pytest.raises(ConfigError, match=r"teacher.safetensors holds I8 tensors where the model has floats"):
        load_unet_teacher(int8)


def test_a_mixture_file_of_integer_tensors_is_refused(tmp_path):
    from dsno.teachers.mnist_gmm import asset_path, load_mnist_gmm
    fit = load_file(str(asset_path(16, 64)))
    path = tmp_path / "mixture.safetensors"
    save_file({**fit, "means": fit["means"].to(torch.int8)}, str(path))
    with pytest.raises(ConfigError, match=r"mixture.safetensors holds I8 tensors where the model has floats \(means\)"):
        load_mnist_gmm(16, 64, path=path)


def test_diffusers_configs_are_bounded_before_diffusers_makes_tensors(tmp_path):
    from dsno.teachers.diffusers import _check_unet_config, scheduler_spec
    with pytest.raises(ConfigError, match=r"num_train_timesteps must be an integer in \[1, 100,000\], "
                                          r"got 10000000000\.0"):
        scheduler_spec({"num_train_timesteps": 1e10})
    with pytest.raises(ConfigError, match=r"trained_betas must be a list of 2 to 100000 entries"):
        scheduler_spec({"trained_betas": [0.01] * 200_000})
    with pytest.raises(ConfigError, match=r"config.json\['block_out_channels'\] entries must be an integer in"):
        _check_unet_config({"sample_size": 32, "block_out_channels": [200000]}, tmp_path / "config.json")


def test_a_file_that_is_no_lightning_checkpoint_is_named(tmp_path):
    from dsno.training.checkpoint_io import AtomicCheckpointIO, NotACheckpointError
    last = tmp_path / "last.ckpt"
    torch.save({"weights": torch.ones(2)}, last)
    with pytest.raises(NotACheckpointError, match=rf"{last} is not a Lightning training checkpoint \(it lacks "
                                                  r"pytorch-lightning_version, state_dict, optimizer_states"):
        AtomicCheckpointIO().load_checkpoint(last)


# -------------------------------------------------------------------------------------------------
# the public API


def _shaped_teacher():
    means = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return dsno.teachers.GaussianMixture(means, torch.full((3,), 0.1), None, schedule=dsno.VPSchedule.linear())


@pytest.mark.parametrize("x_T,message", [
    (torch.full((2, 1, 16, 16), float("nan")), r"x_T holds 512 non-finite values"),
    (torch.randn(2, 3, 16, 16), r"x_T must be a floating-point tensor of shape \[B, 1, 16, 16\], got \(2, 3, 16, 16\)"),
    (torch.randn(2, 1, 8, 8), r"x_T must be a floating-point tensor of shape \[B, 1, 16, 16\], got \(2, 1, 8, 8\)"),
])
def test_sample_checks_x_T_against_the_teacher(x_T, message):
    teacher = _shaped_teacher()
    ts = dsno.timesteps(teacher.schedule, steps=2)
    with pytest.raises(InputError, match=message):
        dsno.solve(teacher, x_T, ts, solver="ddim")
    good = dsno.solve(teacher, torch.randn(2, 1, 16, 16), ts, solver="ddim")
    assert good.shape == (2, 1, 16, 16) and bool(torch.isfinite(good).all())


def test_a_loaded_sampler_names_wrong_arguments(tmp_path):
    folder = _copy(tmp_path)
    sampler = load_sampler(folder)
    x = torch.randn(2, 1, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match=r"x_T holds 1 non-finite values"):
        sampler(x)
    with pytest.raises(InputError, match=r"need an int n in \[0, 33,554,432\]"):
        sampler.sample(10**12)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(InputError, match=rf"device='cuda:{count}', but this machine has {count} CUDA device"):
        load_sampler(folder, device=f"cuda:{count}")
    with pytest.raises(InputError, match=r"device='gpu' is not a device name"):
        load_sampler(folder, device="gpu")
