"""dsno.export / dsno.sampler: the three exported forms agree with the in-memory model; safe loading."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsno import export as export_module
from dsno.export import export_run, export_sampler, main as export_main
from dsno.nn import build_dsno
from dsno.errors import UnsafeFileError
from dsno.sampler import FORM_FILES, load_sampler
from dsno.trust import check_pt2_archive, write_checksums

CONFIG = {
    "format_version": 2,
    "backbone": {"type": "unet", "kwargs": {"in_channels": 1, "out_channels": 1, "base_channels": 8,
                                            "channel_mult": [1, 2], "num_res_blocks": 1,
                                            "attn_resolutions": [4], "image_size": 8, "num_groups": 4}},
    "time_input": "continuous",
    "times": [0.5625, 0.25, 0.0625, 0.0],
    "modes": 2,
    "skip": [0.0, 0.0, 0.0, 0.5],
    "state_shape": [1, 8, 8],
    "data_range": [-1.0, 1.0],
    "schedule": {"kind": "linear", "beta_min": 0.1, "beta_max": 20.0},
}



def trained_like_model(seed: int = 0):
    """A DSNO with every weight random (temporal layers included), as after training."""
    torch.manual_seed(seed)
    model = build_dsno(CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = trained_like_model()
    folder = export_sampler(model, CONFIG, tmp_path_factory.mktemp("run") / "sampler")
    return model, folder


def test_folder_contents_and_config(exported):
    model, folder = exported
    assert sorted(os.listdir(folder)) == sorted(["config.json", "checksums.json", *FORM_FILES.values()])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    config = json.loads((folder / "config.json").read_text())
    assert config == CONFIG
    check_pt2_archive(folder / "sampler.pt2")


@pytest.mark.parametrize("form", ["safetensors", "pt2", "onnx"])
def test_every_form_matches_the_model(exported, form):
    model, folder = exported
    sampler = load_sampler(folder, form=form)
    assert sampler.form == form and sampler.times == CONFIG["times"]
    if form == "safetensors":     # the eager sampler applies its temporal layers as matrices on the CPU
        from dsno.nn.temporal import TemporalConv
        assert {m.impl for m in sampler.model.modules() if isinstance(m, TemporalConv)} == {"matmul"}
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    out = sampler(x)
    assert out.shape == (5, 4, 1, 8, 8) and out.dtype == torch.float32
    assert (out - expected).abs().max() <= 1e-5
    assert expected.abs().max() > 0.1 and (expected[:, 0] - expected[:, 3]).abs().max() > 0.1

    noise = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        final = model(noise)[:, -1].clamp(-1.0, 1.0)
    samples = sampler.sample(7, seed=11, batch_size=3)
    assert samples.shape == (7, 1, 8, 8)
    assert (samples - final).abs().max() <= 1e-5


def test_onnx_through_onnxruntime_directly(exported):
    import onnxruntime as ort
    model, folder = exported
    session = ort.InferenceSession(str(folder / "sampler.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x_T"]
    assert session.get_inputs()[0].shape == ["batch", 1, 8, 8]
    for batch in (1, 6):
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        (out,) = session.run(["trajectory"], {"x_T": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert out.shape == (batch, 4, 1, 8, 8)
        assert np.abs(out - expected).max() <= 1e-5


def test_auto_prefers_safetensors_then_pt2_then_onnx(exported, tmp_path):
    _, folder = exported
    copy = tmp_path / "sampler"
    shutil.copytree(folder, copy)
    assert load_sampler(copy).form == "safetensors"
    (copy / "weights.safetensors").unlink()
    assert load_sampler(copy).form == "pt2"
    (copy / "sampler.pt2").unlink()
    assert load_sampler(copy).form == "onnx"
    with pytest.raises(FileNotFoundError, match="sampler.pt2 is missing"):
        load_sampler(copy, form="pt2")


def test_newer_format_and_missing_files_are_refused(exported, tmp_path):
    _, folder = exported
    newer = tmp_path / "newer"
    shutil.copytree(folder, newer)
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "format_version": 3}))
    write_checksums(newer, json.loads((newer / "checksums.json").read_text())["files"])   # as a newer dsno signs it
    with pytest.raises(ValueError, match="written by a newer dsno; upgrade"):
        load_sampler(newer)
    with pytest.raises(FileNotFoundError, match="no sampler folder at .*python -m dsno.export"):
        load_sampler(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_sampler(tmp_path / "empty")
    with pytest.raises(ValueError, match="form must be 'auto' or one of"):
        load_sampler(folder, form="tflite")


def test_pt2_with_pickled_payload_is_refused(tmp_path):
    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    program = torch.export.export(Double(), (torch.randn(3),))
    torch.export.save(program, str(tmp_path / "with_inputs.pt2"))  # example inputs are a pickle
    with pytest.raises(UnsafeFileError, match="pickled example inputs"):
        check_pt2_archive(tmp_path / "with_inputs.pt2")


def test_sampler_needs_neither_lightning_nor_hydra(exported):
    _, folder = exported
    code = (
        "import sys, torch\n"
        "from dsno.sampler import load_sampler\n"
        "for form in ('safetensors', 'onnx'):\n"
        f"    s = load_sampler({str(folder)!r}, form=form)\n"
        "    assert s.sample(2, seed=0).shape == (2, 1, 8, 8)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric', 'hydra'))\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("clean")


def test_failed_export_leaves_no_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "export_program", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_sampler(trained_like_model(), CONFIG, tmp_path / "sampler", forms=("safetensors", "pt2"))
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_mismatched_config(tmp_path):
    with pytest.raises(ValueError, match="does not match its config"):
        export_sampler(trained_like_model(), {**CONFIG, "modes": 3}, tmp_path / "s", forms=("safetensors",))
    with pytest.raises(ValueError, match="forms must be a non-empty subset"):
        export_sampler(trained_like_model(), CONFIG, tmp_path / "s", forms=("tflite",))


def _exit_line(capsys, call):
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_export_cli_reads_training_checkpoints(tmp_path, capsys):
    from safetensors.torch import save_file
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="dsno_config.json: the training stage writes it"):
        export_run(run)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "dsno_config.json").write_text(json.dumps(CONFIG))
    assert "dsno_ema.safetensors: the training stage writes it" in _exit_line(
        capsys, lambda: export_main([f"run_dir={run}"]))
    model = trained_like_model(seed=4)
    save_file(model.state_dict(), str(run / "checkpoints" / "dsno_ema.safetensors"))
    export_main([f"run_dir={run}", "forms=safetensors"])
    assert "wrote" in capsys.readouterr().out
    sampler = load_sampler(run / "sampler")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert (sampler(x) - model(x)).abs().max() <= 1e-6
    assert "argument rundir: Key 'rundir' not in 'ExportOptions'" in _exit_line(
        capsys, lambda: export_main(["rundir=x"]))
    assert "bad argument 'oops': expected key=value" in _exit_line(capsys, lambda: export_main(["oops"]))
    assert "missing argument run_dir=..." in _exit_line(capsys, lambda: export_main([]))
