"""out= of export and sample_images, the export's temp folders, and a full disk under torch.save.

Nothing the user put in a folder is removed; a killed export's temp folder is removed by the next
one; a full disk or an impossible out= is one `error:` line (exit status 2), never a traceback or
a SIGABRT, and leaves no half-written file.
"""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsno.atomic
import dsno.export as export_module
from dsno.atomic import UnwritableFolderError
from dsno.errors import DiskFullError
from dsno.export import export_sampler, remove_stale_temp_folders
from dsno.sample_images import main as sample_main
from dsno.sample_images import write_samples
from dsno.sampler import load_sampler

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from test_export import CONFIG, trained_like_model  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sampler_dir(tmp_path_factory):
    return export_sampler(trained_like_model(), CONFIG, tmp_path_factory.mktemp("run") / "sampler",
                          forms=("safetensors",))


@pytest.fixture
def foreign(tmp_path):
    """A folder of the user's own files."""
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (folder / "2024" / "notes.txt").write_text("mine")
    return folder


def test_export_refuses_a_folder_of_other_files(foreign):
    before = files(foreign)
    with pytest.raises(UnwritableFolderError, match=rf"^out={foreign} is not empty and not a folder dsno wrote "
                                                    r"\(it holds 2024, holiday.jpg\); nothing was changed"):
        export_sampler(trained_like_model(), CONFIG, foreign, forms=("safetensors",))
    assert files(foreign) == before
    assert sorted(p.name for p in foreign.parent.iterdir()) == ["photos"]


def test_a_folder_of_sampler_like_names_is_not_taken_for_a_sampler(tmp_path):
    """A config.json and weights without export's checksums.json: someone else's model folder."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "weights.safetensors").write_bytes(b"theirs")
    before = files(out)
    with pytest.raises(UnwritableFolderError, match=r"holds config.json, weights.safetensors\); nothing was changed"):
        export_sampler(trained_like_model(), CONFIG, out, forms=("safetensors",))
    assert files(out) == before


def test_sample_images_takes_png_of_its_own_only(sampler_dir, tmp_path):
    out = tmp_path / "samples"
    (out / "png").mkdir(parents=True)
    (out / "png" / "000000.png").write_bytes(b"a picture of the user's")
    with pytest.raises(UnwritableFolderError,
                       match=rf"^out={out} is not empty and not a folder dsno wrote \(it holds png\)"):
        write_samples(sampler_dir, 2, out, batch_size=2, chunk_size=2, progress=False)
    assert files(out) == {"png/000000.png": b"a picture of the user's"}


def test_export_refuses_a_file(tmp_path):
    out = tmp_path / "sampler"
    out.write_bytes(b"mine")
    with pytest.raises(UnwritableFolderError, match=f"out={out} is a file, not a folder"):
        export_sampler(trained_like_model(), CONFIG, out, forms=("safetensors",))
    assert out.read_bytes() == b"mine"


def test_sample_images_refuses_a_folder_of_other_files(sampler_dir, foreign, capsys):
    before = files(foreign)
    with pytest.raises(SystemExit) as e:
        sample_main([f"sampler={sampler_dir}", "n=2", f"out={foreign}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith(f"error: out={foreign} is not empty and not a folder dsno wrote (it holds 2024, holiday.jpg)")
    assert files(foreign) == before


def test_an_empty_folder_and_an_old_sampler_are_replaced_atomically(tmp_path, monkeypatch):
    out = tmp_path / "sampler"
    out.mkdir()
    export_sampler(trained_like_model(seed=1), CONFIG, out, forms=("safetensors", "pt2"))
    first = files(out)
    assert sorted(first) == ["checksums.json", "config.json", "sampler.pt2", "weights.safetensors"]

    def broken(*args, **kwargs):
        raise RuntimeError("verification failed")
    monkeypatch.setattr(export_module, "_verify", broken)      # a failed re-export keeps the old folder whole
    with pytest.raises(RuntimeError, match="verification failed"):
        export_sampler(trained_like_model(seed=2), CONFIG, out, forms=("safetensors",))
    assert files(out) == first
    monkeypatch.undo()

    export_sampler(trained_like_model(seed=2), CONFIG, out, forms=("safetensors",))
    second = files(out)
    assert sorted(second) == ["checksums.json", "config.json", "weights.safetensors"]
    assert second["weights.safetensors"] != first["weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sampler"]          # no temp or old folder left
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert (load_sampler(out)(x) - trained_like_model(seed=2)(x)).abs().max() <= 1e-6


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_killed_exports_temp_folders_are_removed_and_a_live_ones_kept(tmp_path):
    out = tmp_path / "run" / "sampler"
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead, alive = _dead_pid(), live.pid
        for kind, pid in (("tmp", dead), ("old", dead), ("tmp", alive)):
            folder = tmp_path / "run" / f".sampler.{kind}-{pid}"
            folder.mkdir(parents=True)
            (folder / "weights.safetensors").write_bytes(b"\0" * 1000)
        export_sampler(trained_like_model(), CONFIG, out, forms=("safetensors",))
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [f".sampler.tmp-{alive}", "sampler"]
        assert remove_stale_temp_folders(out) == []
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temp_folders(out) == [tmp_path / "run" / f".sampler.tmp-{alive}"]


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def _with_file_size_limit(code: str, limit: int) -> subprocess.CompletedProcess:
    """Run `code` in a process whose files cannot grow past `limit` bytes: a write beyond it fails
    with EFBIG, as one beyond a full disk fails with ENOSPC (SIGXFSZ ignored, as a shell's
    `ulimit -f` run would need)."""
    prelude = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY)); ")
    return subprocess.run([sys.executable, "-c", prelude + code], env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    line = _one_error_line(_with_file_size_limit(
        "import torch; from dsno.errors import report_errors; "
        "from dsno.training.checkpoint_io import AtomicCheckpointIO\n"
        "with report_errors():\n"
        f"    AtomicCheckpointIO().save_checkpoint({{'w': torch.ones(100_000)}}, {str(path)!r})", 64_000))
    assert line.startswith(f"error: disk full while writing {path}: ") and "ulimit -f" in line, line
    assert list(path.parent.iterdir()) == []


def test_a_full_disk_during_a_safetensors_write_is_one_line_and_leaves_nothing(tmp_path):
    """The student's EMA weights, the shipped teachers, the digit classifier and the search's reference
    cache are written by dsno.atomic.atomic_save_safetensors; safetensors' own file writer raised a
    SafetensorError traceback on a full disk."""
    path = tmp_path / "checkpoints" / "dsno_ema.safetensors"
    line = _one_error_line(_with_file_size_limit(
        "import torch; from dsno.errors import report_errors; "
        "from pathlib import Path; from dsno.stages.training import save_student\n"
        "with report_errors():\n"
        f"    save_student({{'w': torch.ones(100_000)}}, {{}}, Path({str(path.parent)!r}))", 64_000))
    assert line.startswith(f"error: disk full while writing {path}: "), line
    assert list(path.parent.iterdir()) == []


@pytest.mark.parametrize("form", ["pt2", "safetensors"])
def test_a_full_disk_during_export_is_one_line_without_sigabrt(form, tmp_path):
    """torch's zip writer, on a failed write of sampler.pt2, used to abort the process (SIGABRT);
    safetensors' own file writer raised a SafetensorError traceback."""
    out = tmp_path / "run" / "sampler"
    result = _with_file_size_limit(
        "from test_export import CONFIG, trained_like_model; from dsno.errors import report_errors; "
        "from dsno.export import export_sampler\n"
        "with report_errors():\n"
        f"    export_sampler(trained_like_model(), CONFIG, {str(out)!r}, forms=[{form!r}])", 20_000)
    assert result.returncode != -signal.SIGABRT
    assert _one_error_line(result).startswith(f"error: disk full while writing {out}: ")
    assert list(out.parent.iterdir()) == []


def test_export_checks_the_room_for_sampler_pt2_first(tmp_path, monkeypatch):
    """ENOSPC: fewer free bytes than the archive needs is refused before torch writes a byte."""
    monkeypatch.setattr(dsno.atomic, "free_bytes", lambda path: 1000)
    out = tmp_path / "sampler"
    with pytest.raises(DiskFullError, match=rf"^disk full while writing {out}: 1,000 bytes free there; free space"):
        export_sampler(trained_like_model(), CONFIG, out, forms=("pt2",))
    assert list(tmp_path.iterdir()) == []
    assert isinstance(DiskFullError("x"), OSError) and errno.ENOSPC in dsno.atomic.DISK_FULL_ERRNOS


IMPOSSIBLE = {"under a file": lambda tmp: tmp / "a-file" / "out", "in /proc": lambda tmp: Path("/proc/dsno-out/x")}


@pytest.mark.parametrize("where", list(IMPOSSIBLE))
def test_an_unwritable_out_is_one_line(where, sampler_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_bytes(b"mine")
    out = IMPOSSIBLE[where](tmp_path)
    with pytest.raises(UnwritableFolderError, match=rf"^cannot write out={out} \(.+\); point out= at a folder"):
        export_sampler(trained_like_model(), CONFIG, out, forms=("safetensors",))
    with pytest.raises(SystemExit) as e:
        sample_main([f"sampler={sampler_dir}", "n=2", f"out={out}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: cannot write out={out} (") and "\n" not in err, err
    assert (tmp_path / "a-file").read_bytes() == b"mine"


def test_a_rerun_into_its_own_folder_still_works(sampler_dir, tmp_path):
    out = tmp_path / "samples"
    write_samples(sampler_dir, 3, out, batch_size=3, chunk_size=2, progress=False)
    first = files(out)
    (out / f".run.json.{_dead_pid()}.tmp").write_bytes(b"half")      # a killed run's temp file
    write_samples(sampler_dir, 3, out, batch_size=3, chunk_size=2, progress=False)
    assert files(out) == first
