"""A crafted pickle that would run code is refused everywhere dsno loads files, and never runs."""

import os
import pickle

import pytest
import torch

from dsno.training.checkpoint_io import CheckpointRefusedError


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_malicious(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Exploit(marker), "global_step": 3}, f)
    # torch.save's zip format, with the same payload
    torch.save({"state_dict": _Exploit(marker)}, str(path) + ".zip")


def test_checkpoint_io_refuses_code_carrying_pickles(tmp_path):
    from dsno.training.checkpoint_io import AtomicCheckpointIO
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "last.ckpt"
    _write_malicious(ckpt, marker)
    for p in (ckpt, str(ckpt) + ".zip"):
        with pytest.raises(CheckpointRefusedError, match="refusing to load checkpoint"):
            AtomicCheckpointIO().load_checkpoint(p)
    assert not marker.exists()


def test_resuming_from_a_malicious_last_ckpt_fails_clearly(tiny_run, tmp_path):
    from dsno.stages.pipeline import run
    rc = tiny_run(run_dir=tmp_path / "run")
    marker = tmp_path / "pwned"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": _Exploit(marker)}, tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointRefusedError, match="refusing to load checkpoint"):
        run(rc, through="train")
    assert not marker.exists()


def test_sampler_and_teacher_files_are_never_unpickled(tmp_path):
    import dsno
    from dsno.teachers.mnist_gmm import load_mnist_gmm
    marker = tmp_path / "pwned"
    bad = tmp_path / "gmm.safetensors"
    _write_malicious(bad, marker)
    with pytest.raises(Exception):
        load_mnist_gmm(path=bad)
    folder = tmp_path / "sampler"
    folder.mkdir()
    (folder / "config.json").write_text('{"format_version": 1}')
    _write_malicious(folder / "weights.safetensors", marker)
    with pytest.raises(Exception):
        dsno.load_sampler(folder)
    assert not marker.exists()
