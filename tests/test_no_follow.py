"""Links planted where dsno writes: no writer follows one, truncates its target or removes it.

Every test plants a symbolic link at a path dsno writes (the final name or its temp name) pointing
at a victim file outside the folder, proves the link live (a plain write through it would reach
the victim), runs the stage and checks: the error is one `LinkRefusedError` line naming the path,
the victim's bytes are untouched and the link itself is still there.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dsno.atomic import LinkRefusedError, atomic_write_text
from dsno.cli import check_writable
from dsno.data.lock import LOCK_NAME, generation_lock, rank_lock_name
from dsno.export import export_sampler
from dsno.sample_images import write_samples
from dsno.stages.training import CONFIG_FILE, WEIGHTS_FILE, save_student
from dsno.training.checkpoint_io import AtomicCheckpointIO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_generate import generate  # noqa: E402
from test_export import CONFIG, trained_like_model  # noqa: E402

PRECIOUS = b"the user's file, which no dsno run may change\n"


@pytest.fixture
def victim(tmp_path):
    """A file outside every folder dsno writes; checked untouched after the test."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_bytes(PRECIOUS)
    yield path
    assert path.read_bytes() == PRECIOUS, "a dsno writer followed a planted link"
    assert sorted(p.name for p in path.parent.iterdir()) == ["precious.txt"], "a dsno writer wrote beside the victim"


def plant(link: Path, target: Path) -> Path:
    """A symbolic link at `link` to `target`, proved live: opening it for writing reaches `target`."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    with open(link, "ab") as f:          # append nothing: the open itself must reach the target
        assert os.fstat(f.fileno()).st_ino == target.stat().st_ino
    return link


def assert_refused(info: pytest.ExceptionInfo, link: Path) -> None:
    message = str(info.value)
    assert message.startswith(f"refusing to write {link}: it is a symbolic link") and "\n" not in message, message
    assert link.is_symlink(), "dsno removed a link it did not make"


def test_the_planted_link_is_live(victim, tmp_path):
    """What the old writers did: a plain write through the planted link replaces the victim's bytes."""
    link = plant(tmp_path / "data" / LOCK_NAME, victim)
    link.write_bytes(b"{}")
    assert victim.read_bytes() == b"{}"
    victim.write_bytes(PRECIOUS)


@pytest.mark.parametrize("name", [LOCK_NAME, "manifest.json.tmp.r0", "shard-00000.x_T.npy", "shard-00000.x_T.npy.tmp",
                                  "shard-00001.states.npy", "shard-00001.states.npy.tmp"])
def test_data_stage_refuses_links(name, victim, tmp_path):
    folder = tmp_path / "data"
    link = plant(folder / name, victim)
    with pytest.raises(LinkRefusedError) as info:
        generate(folder)
    assert_refused(info, link)


@pytest.mark.parametrize("name", [LOCK_NAME, "manifest.json", "verified.json"])
def test_a_complete_data_set_with_a_planted_link_is_refused(name, victim, tmp_path):
    """The reported attack: nothing left to generate, yet the lock was truncated and overwritten."""
    folder = tmp_path / "data"
    generate(folder)
    (folder / name).unlink(missing_ok=True)
    link = plant(folder / name, victim)
    with pytest.raises(LinkRefusedError) as info:
        generate(folder, verify="quick")
    assert_refused(info, link)


def test_rank_locks_refuse_links(victim, tmp_path):
    link = plant(tmp_path / "data" / rank_lock_name(1, 2), victim)
    with pytest.raises(LinkRefusedError) as info:
        with generation_lock(tmp_path / "data", rank=1, world_size=2):
            pass
    assert_refused(info, link)
    assert not (tmp_path / "data" / LOCK_NAME).exists()


@pytest.mark.parametrize("temp", [False, True])
def test_checkpoints_refuse_links(temp, victim, tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    link = plant(path.with_name(f".last.ckpt.{os.getpid()}.tmp") if temp else path, victim)
    with pytest.raises(LinkRefusedError) as info:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert_refused(info, link)
    assert not path.exists() or path.is_symlink()


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE])
def test_student_files_refuse_links(name, victim, tmp_path):
    link = plant(tmp_path / "checkpoints" / name, victim)
    with pytest.raises(LinkRefusedError) as info:
        save_student({"w": torch.ones(2)}, {"times": [0.0]}, tmp_path / "checkpoints")
    assert_refused(info, link)


@pytest.mark.parametrize("where", ["final", "default temp", "named temp"])
def test_every_atomic_write_refuses_links(where, victim, tmp_path):
    """run.json, wandb/runs.json, metrics.json, report.md, schedules ... all go through atomic_path."""
    path = tmp_path / "wandb" / "runs.json"
    link = plant({"final": path, "default temp": path.with_name(f".runs.json.{os.getpid()}.tmp"),
                  "named temp": path.with_name("runs.json.tmp.r0")}[where], victim)
    with pytest.raises(LinkRefusedError) as info:
        atomic_write_text(path, "{}", temp_suffix=".tmp.r0" if where == "named temp" else None)
    assert_refused(info, link)
    assert not path.exists() or path.is_symlink()


def test_the_run_dir_probe_refuses_a_link(victim, tmp_path):
    link = plant(tmp_path / "run" / f".write-test-{os.getpid()}", victim)
    with pytest.raises(LinkRefusedError) as info:
        check_writable(tmp_path / "run")
    assert_refused(info, link)


@pytest.mark.parametrize("name", ["sampler", f".sampler.tmp-{os.getpid()}"])
def test_export_refuses_links(name, victim, tmp_path):
    link = plant(tmp_path / "run" / name, victim)
    with pytest.raises(LinkRefusedError) as info:
        export_sampler(trained_like_model(), CONFIG, tmp_path / "run" / "sampler", forms=("safetensors",))
    assert_refused(info, link)


def test_export_into_a_linked_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_bytes(PRECIOUS)   # a sampler-looking folder somewhere else
    link = plant(tmp_path / "run" / "sampler", elsewhere / "config.json")
    link.unlink()
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(LinkRefusedError) as info:
        export_sampler(trained_like_model(), CONFIG, link, forms=("safetensors",))
    assert_refused(info, link)
    assert [p.name for p in elsewhere.iterdir()] == ["config.json"]
    assert (elsewhere / "config.json").read_bytes() == PRECIOUS


@pytest.fixture(scope="module")
def sampler_dir(tmp_path_factory):
    return export_sampler(trained_like_model(), CONFIG, tmp_path_factory.mktemp("run") / "sampler",
                          forms=("safetensors",))


@pytest.mark.parametrize("name", ["run.json", "samples.npz", "png/000001.png", f"png/.000001.png.{os.getpid()}.tmp",
                                  "chunks/00000.npy", "chunks/00000.sha256", "png"])
def test_sample_images_refuses_links(name, sampler_dir, victim, tmp_path):
    """Planted in the folder of an earlier run, which the rerun rewrites (a file whose bytes differ)."""
    out = tmp_path / "samples"
    write_samples(sampler_dir, 4, out, batch_size=4, chunk_size=2, progress=False)
    shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    (out / "png" / "000001.png").unlink(missing_ok=True)   # rewritten through its temp name
    link = plant(out / name, victim)
    with pytest.raises(LinkRefusedError) as info:
        write_samples(sampler_dir, 4, out, batch_size=4, chunk_size=2, progress=False)
    assert_refused(info, link)


@pytest.mark.parametrize("name", ["checkpoints", "logs", "wandb"])
def test_the_run_folders_dsno_names_refuse_links(name, tiny_run, tmp_path):
    """A link at run_dir/checkpoints, logs or wandb would put last.ckpt, metrics.csv or runs.json
    (replacing a file of that name) in another folder."""
    from dsno import loggers
    from dsno.stages.training import make_trainer
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "version_0").mkdir(parents=True)
    (elsewhere / "last.ckpt").write_bytes(PRECIOUS)
    rc = tiny_run(*(["logger=wandb"] if name == "wandb" else []))
    link = Path(rc.run_dir) / name
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(LinkRefusedError) as info:
        if name == "checkpoints":
            make_trainer(rc, Path(rc.run_dir), None)
        else:
            loggers.training_logger(rc)
    assert_refused(info, link)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["last.ckpt", "version_0"]
    assert (elsewhere / "last.ckpt").read_bytes() == PRECIOUS and not any((elsewhere / "version_0").iterdir())
