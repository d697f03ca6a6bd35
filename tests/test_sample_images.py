"""python -m dsno.sample_images: PNG folder + .npz, chunked and resumable with byte-identical results."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsno.data.generate import noise_seed
from dsno.errors import UserError
from dsno.export import export_sampler
from dsno.nn import build_dsno
from dsno.sample_images import chunk_seed, main, png_bytes, to_pixels, write_samples
from dsno.sampler import load_sampler

N, CHUNK, BATCH = 1000, 50, 25
CONFIG = {
    "format_version": 2,
    "backbone": {"type": "unet", "kwargs": {"in_channels": 1, "out_channels": 1, "base_channels": 8,
                                            "channel_mult": [1, 2], "attn_resolutions": [], "image_size": 8,
                                            "num_groups": 4}},
    "time_input": "continuous",
    "times": [0.5, 0.0],
    "modes": 1,
    "skip": [0.0, 0.5],
    "state_shape": [1, 8, 8],
    "data_range": [-1.0, 1.0],
}



@pytest.fixture(scope="module")
def sampler_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = build_dsno(CONFIG)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return export_sampler(model, CONFIG, tmp_path_factory.mktemp("run") / "sampler", forms=("safetensors",))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(sampler_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dsno.sample_images", f"sampler={sampler_dir}", f"n={N}", f"out={out}",
            "seed=0", f"batch_size={BATCH}", f"chunk_size={CHUNK}"]


def test_kill_and_resume_gives_byte_identical_files(sampler_dir, tmp_path):
    reference = tmp_path / "reference"
    write_samples(sampler_dir, N, reference, seed=0, batch_size=BATCH, chunk_size=CHUNK, progress=False)

    resumed = tmp_path / "resumed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli(sampler_dir, resumed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    first_chunk = resumed / "chunks" / "00000.npy"
    deadline = time.monotonic() + 120
    while not first_chunk.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, f"run ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
    done = sorted((resumed / "chunks").glob("*.npy"))
    assert 1 <= len(done) < N // CHUNK and not (resumed / "samples.npz").exists()

    finished = subprocess.run(cli(sampler_dir, resumed), env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert tree(resumed) == tree(reference)

    samples = np.load(resumed / "samples.npz")["samples"]
    assert samples.shape == (N, 8, 8, 1) and samples.dtype == np.uint8
    assert samples.std() > 10
    assert len(list((resumed / "png").iterdir())) == N
    assert np.array_equal(np.array(Image.open(resumed / "png" / "000777.png")), samples[777, :, :, 0])
    # chunk c holds the sampler's images for seed chunk_seed(seed, c)
    sampler = load_sampler(sampler_dir)
    chunk3 = to_pixels(sampler.sample(CHUNK, seed=chunk_seed(0, 3), batch_size=BATCH), (-1.0, 1.0))
    assert np.array_equal(samples[3 * CHUNK:4 * CHUNK], chunk3)


def test_rerun_with_other_settings_is_refused_and_missing_pngs_are_rewritten(sampler_dir, tmp_path):
    out = tmp_path / "out"
    write_samples(sampler_dir, 60, out, seed=1, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    before = tree(out)
    (out / "png" / "000010.png").unlink()
    write_samples(sampler_dir, 60, out, seed=1, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    assert tree(out) == before
    with pytest.raises(UserError, match="different seed"):
        write_samples(sampler_dir, 60, out, seed=2, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    record = json.loads((out / "run.json").read_text())
    del record["noise"]                                # a folder written before the noise rule was recorded
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="different noise"):
        write_samples(sampler_dir, 60, out, seed=1, batch_size=BATCH, chunk_size=CHUNK, progress=False)


def test_chunk_seed_is_the_recorded_blake2b_rule():
    import hashlib
    import struct
    for seed, c in ((0, 0), (0, 3), (2**63 - 1, 12345)):
        digest = hashlib.blake2b(struct.pack("<QQ", seed, c), digest_size=8, person=b"dsno.chunk").digest()
        assert chunk_seed(seed, c) == int.from_bytes(digest, "little")
    assert chunk_seed(0, 3) != noise_seed(0, 3)       # the chunk and trajectory streams differ


def test_uint8_mapping_and_rgb_png():
    images = torch.tensor([[[[-1.0, 0.0], [1.0, 2.0]]] * 3])  # [1, 3, 2, 2]
    out = to_pixels(images, (-1.0, 1.0))
    assert out.shape == (1, 2, 2, 3) and out.dtype == np.uint8
    assert out[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    assert to_pixels(torch.tensor([[[[0.0, 0.5, 1.0]]]]), (0.0, 1.0))[0, 0, :, 0].tolist() == [0, 128, 255]
    import io
    decoded = np.array(Image.open(io.BytesIO(png_bytes(out[0]))))
    assert decoded.shape == (2, 2, 3) and np.array_equal(decoded, out[0])


def _exit_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_arguments_are_checked(tmp_path, capsys):
    out = f"out={tmp_path / 'o'}"
    assert "missing argument n=..." in _exit_line(capsys, [f"sampler={tmp_path}", out])
    assert "argument n: Value 'ten' of type 'str' could not be converted to Integer" in _exit_line(
        capsys, [f"sampler={tmp_path}", "n=ten", out])
    assert "no sampler folder" in _exit_line(capsys, [f"sampler={tmp_path / 'missing'}", "n=10", out])
    assert "n=1000000000000: must be an integer in [1, 100000000]" in _exit_line(
        capsys, [f"sampler={tmp_path}", "n=1000000000000", out])
    assert "seed=-1: must be an integer in [0, 9223372036854775807]" in _exit_line(
        capsys, [f"sampler={tmp_path}", "n=5", "seed=-1", out])
    assert not (tmp_path / "o").exists()


def test_tampered_chunks_are_redone_and_tampered_pngs_rewritten(sampler_dir, tmp_path):
    out = tmp_path / "out"
    write_samples(sampler_dir, 100, out, seed=3, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    before = tree(out)
    chunk = out / "chunks" / "00001.npy"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF                                   # one pixel of the last image, header intact
    chunk.write_bytes(bytes(data))
    (out / "png" / "000007.png").write_bytes(png_bytes(np.zeros((8, 8, 1), np.uint8)))
    write_samples(sampler_dir, 100, out, seed=3, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    assert tree(out) == before
