"""What a user sees: a diffusers folder given to another teacher kind, a wrapped network's time
convention, a help line for every key, a rerun of a complete run, Ctrl-C, Lightning's log lines."""

import pytest


@pytest.mark.parametrize("marker", ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("kind", ["unet", "psld_unet", "mnist_gmm", "gmm_file"])
def test_a_diffusers_folder_under_another_kind_names_teacher_diffusers(tmp_path, kind, marker):
    from dsno.builders import build_teacher
    from dsno.config import teacher_config
    from dsno.teachers.base import TeacherLoadError
    folder = tmp_path / "ddpm"
    (folder / marker).parent.mkdir(parents=True, exist_ok=True)
    (folder / marker).write_text("{}")
    with pytest.raises(TeacherLoadError) as e:
        build_teacher(teacher_config({"kind": kind, "path": str(folder)}))
    msg = str(e.value)
    assert "\n" not in msg and "add teacher=diffusers" in msg and f"teacher.kind={kind}" in msg
    assert "not found" not in msg


def test_a_plain_missing_folder_keeps_its_kinds_message(tmp_path):
    from dsno.builders import build_teacher
    from dsno.config import teacher_config
    from dsno.teachers.base import TeacherLoadError
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="not found; make them with"):
        build_teacher(teacher_config({"kind": "unet", "path": str(tmp_path / "empty")}))
