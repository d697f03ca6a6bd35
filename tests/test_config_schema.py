"""The config cannot lie: the schema (dsno/config.py and each teacher kind's dataclass) is the only
place a default is written, every YAML key changes what its config composes to, and every teacher
key changes what is loaded or is refused."""

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import CONF, TINY_RUN, compose
from omegaconf import OmegaConf

from dsno.builders import build_teacher
from dsno.config import ConfigError, teacher_config, validate
from dsno.config import compose as compose_config
from dsno.teachers.base import TeacherLoadError
from dsno.teachers.registry import teacher_kinds

YAMLS = sorted(p.relative_to(CONF).as_posix() for p in Path(CONF).rglob("*.yaml") if p.name != "config.yaml")


def _leaves(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, (*prefix, k))
        else:
            out.append((*prefix, k))
    return out


def _composed(conf_dir: Path, overrides: list[str]) -> dict:
    d = OmegaConf.to_container(compose_config(*overrides, config_dir=conf_dir), resolve=False)
    d.pop("hydra", None)
    return d


def _overrides(rel: str) -> list[str]:
    group, stem = rel.rsplit("/", 1)[0], Path(rel).stem
    return [f"experiment={stem}", "teacher.path=/tmp"] if group == "experiment" and stem in ("cifar10_ddpm", "diffusers_quick") else \
        [f"experiment={stem}"] if group == "experiment" else ["experiment=mnist_gmm", f"{group}={stem}"]


def test_every_yaml_file_is_checked():
    assert "experiment/mnist_unet_quick.yaml" in YAMLS and "trainer/gpu.yaml" in YAMLS and "logger/csv.yaml" in YAMLS
    assert not any(r.startswith(("teacher/", "solver/", "data/", "train/", "eval/", "model/")) for r in YAMLS), \
        "group files that only repeat schema defaults are gone: the schema lives in dsno/config.py"


@pytest.mark.parametrize("rel", YAMLS)
def test_no_yaml_key_repeats_what_the_config_has_anyway(rel, tmp_path):
    """Remove each key of the file in turn: the composed config must change (else the key only
    repeats a schema default, or a value of the file's own defaults, and can drift from it)."""
    body = yaml.safe_load((Path(CONF) / rel).read_text()) or {}
    body.pop("defaults", None)
    overrides = _overrides(rel)
    full = _composed(Path(CONF), overrides)
    keys = _leaves(body)
    assert keys, f"{rel} sets nothing"
    for key in keys:
        conf = tmp_path / "conf"
        shutil.rmtree(conf, ignore_errors=True)
        shutil.copytree(CONF, conf)
        text = (conf / rel).read_text()
        data = yaml.safe_load(text)
        node = data
        for k in key[:-1]:
            node = node[k]
        del node[key[-1]]
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("# @package"))
        (conf / rel).write_text(header + yaml.safe_dump(data))
        assert _composed(conf, overrides) != full, f"{rel}: {'.'.join(key)} repeats what the config has anyway"


def test_a_repeated_default_is_caught(tmp_path):
    """The check above fails on a file that repeats a schema default (proved on a copy)."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    rel = "trainer/gpu.yaml"
    (conf / rel).write_text((conf / rel).read_text() + "num_nodes: 1\n")       # TrainerConfig's own default
    overrides = _overrides(rel)
    full = _composed(conf, overrides)
    data = yaml.safe_load((conf / rel).read_text())
    del data["num_nodes"]
    (conf / rel).write_text(yaml.safe_dump(data))
    assert _composed(conf, overrides) == full


# --- every teacher key changes what is loaded, or is refused -----------------------------------------
def _outcome(kind: str, **values):
    """The loaded teacher's fingerprint, or the one-line refusal, for teacher kind `kind` with `values`."""
    raw = {"kind": kind, **values}
    try:
        return build_teacher(teacher_config(OmegaConf.create(raw))).fingerprint()
    except (ConfigError, TeacherLoadError) as e:
        return f"refused: {e}"


UNET_ASSET = Path(__file__).resolve().parent.parent / "dsno" / "assets" / "mnist_unet16.safetensors"
GMM_ASSET = Path(__file__).resolve().parent.parent / "dsno" / "assets" / "mnist_gmm16_k64.safetensors"
CHANGES = {
    "mnist_gmm": {"size": 8, "components": 32, "path": str(UNET_ASSET), "schedule.kind": "cosine",
                  "schedule.beta_min": 0.2, "schedule.beta_max": 15.0, "schedule.s": 0.01, "schedule.num_steps": 500,
                  "schedule.beta_start": 2e-4, "schedule.beta_end": 0.03},
    "mnist_gmm_cond": {"size": 8, "per_class": 4, "path": str(UNET_ASSET), "guidance": 1.5, "schedule.kind": "cosine",
                       "schedule.beta_min": 0.2, "schedule.beta_max": 15.0, "schedule.s": 0.01,
                       "schedule.num_steps": 500, "schedule.beta_start": 2e-4, "schedule.beta_end": 0.03},
    "gmm_file": {"path": str(UNET_ASSET), "schedule.kind": "cosine", "schedule.beta_min": 0.2,
                 "schedule.beta_max": 15.0, "schedule.s": 0.01, "schedule.num_steps": 500,
                 "schedule.beta_start": 2e-4, "schedule.beta_end": 0.03},
    "unet": {"size": 8, "path": str(GMM_ASSET), "prediction": "x0", "schedule.kind": "cosine",
             "schedule.beta_min": 0.2, "schedule.beta_max": 15.0, "schedule.s": 0.01, "schedule.num_steps": 500,
             "schedule.beta_start": 2e-4, "schedule.beta_end": 0.03},
    "mnist_unet_cond": {"size": 8, "path": str(UNET_ASSET), "prediction": "x0", "guidance": 1.5,
                        "schedule.kind": "cosine", "schedule.beta_min": 0.2, "schedule.beta_max": 15.0,
                        "schedule.s": 0.01, "schedule.num_steps": 500, "schedule.beta_start": 2e-4,
                        "schedule.beta_end": 0.03},
    "diffusers": {"path": "/nonexistent-diffusers-folder", "prediction": "v", "null_label": 9, "guidance": 1.0},
    "psld_mnist_gmm": {"size": 8, "components": 32, "path": str(UNET_ASSET), "beta_min": 4.0, "beta_max": 12.0,
                       "nu": 3.0, "gamma": 0.5, "m_inv": 2.0, "kappa": 0.1},
    "psld_unet": {"size": 8, "path": str(UNET_ASSET)},       # no shipped 8x8 one; a VP teacher's file
}
BASE = {"gmm_file": {"path": str(GMM_ASSET)}, "diffusers": {"path": str(Path(__file__).resolve().parent)}}


def _nested(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def test_every_key_of_every_teacher_kind_is_tested():
    for name, kind in teacher_kinds().items():
        keys = {".".join(k) for k in _leaves(OmegaConf.to_container(OmegaConf.structured(kind.config)))} - {"kind"}
        assert keys == set(CHANGES[name]), f"teacher kind {name}: keys {sorted(keys)} vs tested {sorted(CHANGES[name])}"


@pytest.mark.parametrize("kind", ["mnist_gmm", "mnist_gmm_cond", "gmm_file", "unet", "mnist_unet_cond", "psld_mnist_gmm",
                                  "psld_unet"])
def test_every_teacher_key_changes_what_is_loaded_or_is_refused(kind):
    base = BASE.get(kind, {})
    reference = _outcome(kind, **_nested(base))
    assert not str(reference).startswith("refused"), reference
    for key, value in CHANGES[kind].items():
        changed = _outcome(kind, **_nested({**base, key: value}))
        assert changed != reference, f"teacher kind {kind}: {key}={value} loads the same teacher"


def test_diffusers_keys_are_refused_or_checked_against_the_folder():
    assert _outcome("diffusers", path="/nonexistent-diffusers-folder").startswith("refused: config error: teacher.path")
    assert "teacher.prediction='vee'" in _outcome("diffusers", path="/tmp", prediction="vee")
    with pytest.raises(ConfigError, match="teacher kind diffusers has no key 'size'"):
        teacher_config(OmegaConf.create({"kind": "diffusers", "path": "/tmp", "size": 32}))


def test_solver_options_are_set_without_plus_and_checked_by_the_registry(tmp_path):
    rc = validate(compose(f"run_dir={tmp_path}", *TINY_RUN, "solver.options.method=singlestep"))
    assert rc.solver.options == {"method": "singlestep"} and rc.solver.order == 3
    rc = validate(compose(f"run_dir={tmp_path}", *TINY_RUN, "eval.solvers=[{name:dpm_solver,order:2,options:{method:fast}}]"))
    assert [(s.label(), s.kwargs()) for s in rc.eval.solvers] == [("dpm_solver-2 method=fast",
                                                                   {"order": 2, "method": "fast"})]


# --- a validated config holds plain values -----------------------------------------------------------
EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def _leaf_types(obj, path="rc"):
    if hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            if hasattr(obj, name) and not name.isupper():
                yield from _leaf_types(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaf_types(v, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_types(v, f"{path}.{k}")
    else:
        yield path, type(obj)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_validated_config_holds_only_plain_values(name, tmp_path):
    """Enum choices come out as their str value: fingerprints and records compare them with the strings
    a manifest or a user's file holds (a StrEnum there once made a neural data set unreadable to itself)."""
    extra = [f"teacher.path={tmp_path}"] if name in ("cifar10_ddpm", "diffusers_quick") else []
    rc = validate(compose(f"experiment={name}", *extra))
    odd = [(p, t) for p, t in _leaf_types(rc) if t not in (str, int, float, bool, type(None))]
    assert not odd, odd


def test_a_neural_teacher_data_set_is_found_again_across_shards(tmp_path):
    """The UNet teacher's data set (float32 solve, so its fingerprint records data.precision) written in
    two shards, then asked for again: the same data set, nothing regenerated."""
    from dsno.stages.pipeline import make_data
    rc = validate(compose("experiment=mnist_unet_quick", f"run_dir={tmp_path}", "data.num_trajectories=8",
                          "data.shard_size=4", "data.batch_size=4", "solver.steps=4", "logger=csv"))
    folder = make_data(rc)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    assert len(stamps) == 4                                   # two shards, x_T and states each
    make_data(rc)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")} == stamps
