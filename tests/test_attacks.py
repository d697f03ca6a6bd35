"""Attacks on the files dsno opens: none may run code, read outside its folder or load silently.

Every crafted pickle here would create a marker file when unpickled (checked once below); each
test asserts the one-line refusal and that no marker appears.
"""

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from dsno.errors import UnsafeFileError
from dsno.export import export_sampler
from dsno.nn import build_dsno
from dsno.sampler import SamplerFileError, load_sampler
from dsno.trust import TamperedFileError, check_onnx_model, check_pt2_archive, write_checksums
from test_export import CONFIG, trained_like_model


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payload(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"x": _Exploit(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return export_sampler(trained_like_model(), CONFIG, tmp_path_factory.mktemp("attack") / "sampler")


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a crafted payload ran"


def test_the_payloads_are_live(tmp_path):
    live = tmp_path / "live"
    torch.load(io.BytesIO(_payload(live)), weights_only=False)
    assert live.exists()
    live.unlink()
    pickle.loads(pickle.dumps(_Exploit(live)))
    assert live.exists()


def _tampered_copy(folder: Path, dest: Path, *, replace=None, add=None, drop=()) -> Path:
    """A copy of the sampler folder whose sampler.pt2 is rewritten, with fresh checksums (a
    coherent folder from elsewhere)."""
    shutil.copytree(folder, dest)
    src = zipfile.ZipFile(folder / "sampler.pt2")
    replace, add = dict(replace or {}), dict(add or {})
    with zipfile.ZipFile(dest / "sampler.pt2", "w") as out:
        for info in src.infolist():
            if info.filename in drop:
                continue
            out.writestr(info.filename, replace.get(info.filename, src.read(info)))
        for name, data in add.items():
            out.writestr(name, data)
    write_checksums(dest, ["config.json", "weights.safetensors", "sampler.pt2", "sampler.onnx"])
    return dest


def _config_json(folder: Path, member: str, edit) -> bytes:
    data = json.loads(zipfile.ZipFile(folder / "sampler.pt2").read(member))
    edit(data)
    return json.dumps(data).encode()


def _first(data: dict) -> dict:
    return next(iter(data["config"].values()))


W_CFG = "sampler/data/weights/model_weights_config.json"
C_CFG = "sampler/data/constants/model_constants_config.json"
GRAPH = "sampler/models/model.json"


def _pickled_weight(folder, m):
    def edit(d):
        _first(d)["use_pickle"] = True
    return {"replace": {W_CFG: _config_json(folder, W_CFG, edit), "sampler/data/weights/weight_0": _payload(m)}}


def _pickled_constant(folder, m):
    def edit(d):
        _first(d)["use_pickle"] = True
    return {"replace": {C_CFG: _config_json(folder, C_CFG, edit), "sampler/data/constants/tensor_0": _payload(m)}}


def _custom_object(prefix):
    def make(folder, m):
        def edit(d):
            d["config"]["evil"] = {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True,
                                   "tensor_meta": None}
        return {"replace": {C_CFG: _config_json(folder, C_CFG, edit)},
                "add": {f"sampler/data/constants/{prefix}0": pickle.dumps(_Exploit(m))}}
    return make


def _guard_code(folder, m):
    def edit(d):
        d["guards_code"] = [f"__import__('os').system('touch {m}')"]
    return {"replace": {GRAPH: _config_json(folder, GRAPH, edit)}}


def _target(folder, m):
    def edit(d):
        nodes = d["graph_module"]["graph"]["nodes"]
        nodes[0]["target"] = "torch.load"
    return {"replace": {GRAPH: _config_json(folder, GRAPH, edit)}}


def _expression(folder, m):
    def edit(d):
        def walk(o):
            if isinstance(o, dict):
                for k, v in o.items():
                    if k == "expr_str":
                        o[k] = f"__import__('os').system('touch {m}')"
                        return True
                    if walk(v):
                        return True
            elif isinstance(o, list):
                return any(walk(v) for v in o)
            return False
        assert walk(d)
    return {"replace": {GRAPH: _config_json(folder, GRAPH, edit)}}


ATTACKS = {
    "pickled weight": (_pickled_weight, "stores 'backbone"),
    "pickled constant": (_pickled_constant, "as a pickle"),
    "custom object constant": (_custom_object("custom_obj_"), "stores 'evil' as a pickle"),
    "opaque object constant": (_custom_object("opaque_obj_"), "stores 'evil' as a pickle"),
    "pickle under a nested path": (lambda f, m: {"add": {"sampler/data/constants/deep/er/tensor_7": _payload(m)}},
                                   "member sampler/data/constants/deep/er/tensor_7 is not part of"),
    "legacy weights member": (lambda f, m: {"add": {"sampler/data/weights/model.pt": _payload(m)}},
                              "member sampler/data/weights/model.pt is not part of"),
    "weights config removed (legacy fallback)": (lambda f, m: {"drop": {W_CFG}}, "is missing (torch would fall back"),
    "pickled example inputs": (lambda f, m: {"replace": {"sampler/data/sample_inputs/model.pt": _payload(m)}},
                               "stores pickled example inputs"),
    "member outside the root": (lambda f, m: {"add": {"evil/payload.pkl": _payload(m)}}, "share one root folder"),
    "path traversal member": (lambda f, m: {"add": {"sampler/../../payload.pkl": _payload(m)}}, "unsafe name"),
    "aot inductor blob": (lambda f, m: {"add": {"sampler/data/aotinductor/model/model.so": b"\x7fELF"}},
                          "is not part of a plain torch.export archive"),
    "guard code": (_guard_code, "carries guard code"),
    "non-ATen target": (_target, "calls 'torch.load', which is not an ATen operator"),
    "code in a shape expression": (_expression, "outside the grammar of shape expressions"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_crafted_pt2_archives_are_refused_even_when_trusted(attack, folder, tmp_path, marker):
    make, message = ATTACKS[attack]
    bad = _tampered_copy(folder, tmp_path / "bad", **make(folder, marker))
    with pytest.raises(UnsafeFileError) as e:
        load_sampler(bad, form="pt2", trust_program=True)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UnsafeFileError):
        check_pt2_archive(bad / "sampler.pt2")


def test_a_file_that_is_no_archive_is_refused(tmp_path):
    (tmp_path / "x.pt2").write_bytes(b"not a zip at all")
    with pytest.raises(UnsafeFileError, match="is not a torch.export archive"):
        check_pt2_archive(tmp_path / "x.pt2")


def test_programs_from_another_install_need_trust_program(folder, tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    (foreign / "weights.safetensors").unlink()
    assert load_sampler(foreign).form == "pt2"                      # made here: allowed
    monkeypatch.setenv("DSNO_KEY_FILE", str(tmp_path / "other-install.key"))
    with pytest.raises(UnsafeFileError, match="has no weights.safetensors, and its sampler.pt2 was not exported "
                                              "by this dsno install; a program file can run code"):
        load_sampler(foreign)
    for form in ("pt2", "onnx"):
        with pytest.raises(UnsafeFileError, match=f"sampler.{form} was not exported by this dsno install"):
            load_sampler(foreign, form=form)
        assert load_sampler(foreign, form=form, trust_program=True).form == form
    shutil.copy(folder / "weights.safetensors", foreign)
    assert load_sampler(foreign).form == "safetensors"             # safetensors never needs trust


def test_changed_files_are_refused_by_name(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "weights.safetensors").read_bytes())
    data[-5] ^= 0x01
    (bad / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(TamperedFileError, match=r"weights.safetensors was changed after export"):
        load_sampler(bad)
    shutil.copy(folder / "weights.safetensors", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "modes": 1}))
    with pytest.raises(TamperedFileError, match=r"config.json was changed after export"):
        load_sampler(bad)
    shutil.copy(folder / "config.json", bad)
    (bad / "checksums.json").unlink()
    with pytest.raises(TamperedFileError, match="checksums.json is missing"):
        load_sampler(bad)
    record = json.loads((folder / "checksums.json").read_text())
    record["files"]["../../etc/passwd"] = "0" * 64
    (bad / "checksums.json").write_text(json.dumps(record))
    with pytest.raises(TamperedFileError, match=r"lists '../../etc/passwd': only plain file names"):
        load_sampler(bad)


def test_bad_config_and_weights_are_named(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "config.json").write_text("{not json")
    write_checksums(bad, ["config.json"])      # checksums are checked first: these files are signed as they are
    with pytest.raises(SamplerFileError, match=r"config.json is not valid JSON"):
        load_sampler(bad)
    (bad / "config.json").write_text(json.dumps({**CONFIG, "backbone": {"type": "pickle"}}))
    write_checksums(bad, ["config.json"])
    with pytest.raises(SamplerFileError, match=r"config.json: config\['backbone'\]\['type'\] must be"):
        load_sampler(bad)
    shutil.copy(folder / "config.json", bad)
    (bad / "weights.safetensors").write_bytes(b"\x00" * 64)
    write_checksums(bad, ["config.json", "weights.safetensors"])
    with pytest.raises(SamplerFileError, match=r"weights.safetensors is not a readable safetensors file"):
        load_sampler(bad)
    # a config that asks for a huge model is compared on the meta device: nothing is allocated
    huge = {**CONFIG, "backbone": {**CONFIG["backbone"], "kwargs": {**CONFIG["backbone"]["kwargs"],
                                                                    "base_channels": 4096, "num_groups": 4}}}
    shutil.copy(folder / "weights.safetensors", bad)
    (bad / "config.json").write_text(json.dumps(huge))
    write_checksums(bad, ["config.json", "weights.safetensors"])
    with pytest.raises(SamplerFileError, match=r"weights.safetensors does not fit its config.json: .*wrong shape"):
        load_sampler(bad)


def test_a_program_that_does_not_match_its_config_is_refused_at_load(folder, tmp_path):
    three = {**CONFIG, "times": CONFIG["times"][1:], "skip": CONFIG["skip"][1:]}
    torch.manual_seed(1)
    other = export_sampler(build_dsno(three).eval(), three, tmp_path / "other", forms=("pt2", "onnx"))
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    for name in ("sampler.pt2", "sampler.onnx"):
        shutil.copy(other / name, mixed / name)
    write_checksums(mixed, ["config.json", "sampler.pt2", "sampler.onnx"])
    for form in ("pt2", "onnx"):
        with pytest.raises(SamplerFileError, match=rf"sampler.{form} maps \[2, 1, 8, 8\] to \(2, 3, 1, 8, 8\), but "
                                                   r"config.json declares \[B, M=4, c, H, W\]"):
            load_sampler(mixed, form=form, trust_program=True)


def _onnx_with_external(folder: Path, location: str, domain: str = "") -> Path:
    """A sampler.onnx whose one initializer keeps its bytes at `location`."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Add", ["x_T", "w"], ["trajectory"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x_T", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("trajectory", TensorProto.FLOAT, [1])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = folder / "sampler.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location,message", [
    ("../secret.bin", "reads external data from '../secret.bin'; only a plain file name"),
    ("/etc/passwd", "reads external data from '/etc/passwd'; only a plain file name"),
    ("sub/dir.bin", "reads external data from 'sub/dir.bin'; only a plain file name"),
    ("link.bin", "link.bin, which is missing or not a regular file"),
])
def test_onnx_external_data_stays_inside_the_folder(tmp_path, location, message):
    folder = tmp_path / "sampler"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 4)
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    path = _onnx_with_external(folder, location)
    with pytest.raises(UnsafeFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_onnx_model(path)


def test_onnx_unlisted_external_data_and_foreign_domains_are_refused(tmp_path):
    folder = tmp_path / "sampler"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "w.bin").write_bytes(np.ones(1, np.float32).tobytes())
    _onnx_with_external(folder, "w.bin")
    assert check_onnx_model(folder / "sampler.onnx") == ["w.bin"]
    write_checksums(folder, ["config.json", "sampler.onnx"])
    with pytest.raises(UnsafeFileError, match=r"reads external data from .*w.bin, which checksums.json does not "
                                              "list"):
        load_sampler(folder, form="onnx", trust_program=True)
    _onnx_with_external(folder, "w.bin", domain="evil.custom")
    with pytest.raises(UnsafeFileError, match="uses the operator domain 'evil.custom'"):
        check_onnx_model(folder / "sampler.onnx")
    (folder / "sampler.onnx").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(UnsafeFileError, match="is not a readable ONNX model"):
        check_onnx_model(folder / "sampler.onnx")


def test_malicious_and_truncated_checkpoints_are_refused(tmp_path, marker):
    from dsno.training.checkpoint_io import AtomicCheckpointIO, CheckpointRefusedError
    io_ = AtomicCheckpointIO()
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(_payload(marker))
    good = tmp_path / "good.ckpt"
    io_.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 3, "pytorch-lightning_version": "2.5",
                         "optimizer_states": [], "lr_schedulers": []}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:100])
    for path in (evil, truncated):
        with pytest.raises(CheckpointRefusedError, match=rf"refusing to load checkpoint {path}: it is corrupt or "
                                                         "holds objects other than tensors"):
            io_.load_checkpoint(path)
    assert io_.load_checkpoint(good)["global_step"] == 3


def test_a_full_disk_during_a_checkpoint_says_so_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from dsno.errors import DiskFullError
    from dsno.training.checkpoint_io import AtomicCheckpointIO

    def fill_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_disk)
    path = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(DiskFullError, match=rf"disk full while writing {path}: [\d,]+ bytes free there"):
        AtomicCheckpointIO().save_checkpoint({"w": 1}, path)
    assert list((tmp_path / "checkpoints").iterdir()) == []
