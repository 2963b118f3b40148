"""One source for defaults: every value conf/defaults.yaml and conf/jobs/*.yaml write equals the
dataclass default of its field, every field has its documentation, and describe(job) prints
them as commented YAML that loads back to the same defaults."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from dollyflow.config import Config, ConfigError, describe, load_defaults
from dollyflow.config.reference import JOB_SECTIONS, SHARED_SECTIONS, TOP_LEVEL

CONF = Path(__file__).resolve().parents[2] / "conf"
DEFAULT_FILES = [CONF / "defaults.yaml", *sorted((CONF / "jobs").glob("*.yaml"))]
#: Keys that differ on purpose. preset and env are not values but the choice of two more layers:
#: the dataclass default "" means "no such layer" (a conf dir without defaults.yaml, as tests
#: write, loads none), and defaults.yaml chooses pythia-2.8b and local for a checkout.
LAYER_CHOICES = {("defaults.yaml", "preset"): "pythia-2.8b", ("defaults.yaml", "env"): "local"}


def _same(written, default) -> bool:
    """Equal, and of the same kind: True is not 1, but 5.0e-6 (float) is 5e-6 and 0.0 is 0."""
    if isinstance(written, bool) or isinstance(default, bool):
        return type(written) is type(default) and written == default
    if isinstance(written, (int, float)) and isinstance(default, (int, float)):
        return written == default
    return type(written) is type(default) and written == default


def _differences(obj, data: dict, prefix: str, path: Path) -> list[str]:
    out = []
    names = {f.name for f in dataclasses.fields(obj)}
    for key, written in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            out.append(f"{path.name}: {dotted}: no such field")
            continue
        default = getattr(obj, key)
        if dataclasses.is_dataclass(default):
            out += _differences(default, written, dotted + ".", path)
        elif (path.name, dotted) in LAYER_CHOICES:
            documented = LAYER_CHOICES[path.name, dotted]
            if written != documented:
                out.append(f"{path.name}: {dotted}: {written!r}, documented here as {documented!r}")
        elif not _same(written, default):
            out.append(f"{path.name}: {dotted}: the YAML writes {written!r}, the dataclass default is {default!r}")
    return out


@pytest.mark.parametrize("path", DEFAULT_FILES, ids=lambda p: p.name)
def test_every_yaml_default_equals_the_dataclass_default(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and data, path
    differences = _differences(Config(), data, "", path)
    assert not differences, "\n".join(differences)


def test_the_check_sees_a_difference(tmp_path):
    """The comparison is real: a changed value, a bool written as 1 and an unknown key are caught."""
    bad = tmp_path / "train.yaml"
    bad.write_text("train:\n  epochs: 3\n  mlflow: 1\n  learning_rate: 5.0e-6\n  nope: 1\n")
    differences = _differences(Config(), yaml.safe_load(bad.read_text()), "", bad)
    assert differences == ["train.yaml: train.epochs: the YAML writes 3, the dataclass default is 2",
                           "train.yaml: train.mlflow: the YAML writes 1, the dataclass default is True",
                           "train.yaml: train.nope: no such field"]


def test_the_layer_choices_name_existing_layers():
    data = yaml.safe_load((CONF / "defaults.yaml").read_text(encoding="utf-8"))
    assert (CONF / "model" / f"{data['preset']}.yaml").is_file()
    assert (CONF / "env" / f"{data['env']}.yaml").is_file()


def _dataclasses():
    cfg = Config()
    return [Config] + [type(getattr(cfg, f.name)) for f in dataclasses.fields(Config)
                       if dataclasses.is_dataclass(getattr(cfg, f.name))]


@pytest.mark.parametrize("cls", _dataclasses(), ids=lambda c: c.__name__)
def test_every_field_has_its_documentation(cls):
    assert cls.__doc__ and cls.__doc__.strip()
    undocumented = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("doc", "").strip()]
    assert not undocumented, f"{cls.__name__}: fields without a doc: {undocumented}"


def test_defaults_layers_equal_the_dataclasses_but_the_layer_choices():
    loaded = load_defaults("train").to_dict()
    plain = Config(job="train").to_dict()
    assert (loaded.pop("preset"), loaded.pop("env")) == ("pythia-2.8b", "local")
    plain.pop("preset"), plain.pop("env")
    assert loaded == plain


@pytest.mark.parametrize("job", sorted(JOB_SECTIONS))
def test_describe_loads_back_to_the_defaults(job, tmp_path):
    text = describe(job)
    data = yaml.safe_load(text)
    defaults = load_defaults(job).to_dict()
    assert list(data) == [*TOP_LEVEL, *SHARED_SECTIONS, *JOB_SECTIONS[job]]
    for key, value in data.items():
        assert value == defaults[key], key
        for name, item in (value.items() if isinstance(value, dict) else ()):
            assert _same(item, defaults[key][name]), f"{key}.{name}"
    # as a conf layer of its own (keys and types checked), it gives the same configuration
    (tmp_path / "defaults.yaml").write_text(text)
    assert load_defaults(job, tmp_path).to_dict() == defaults


@pytest.mark.parametrize("job", sorted(JOB_SECTIONS))
def test_describe_puts_each_fields_doc_above_its_key(job):
    cfg = Config()
    shown = (*TOP_LEVEL, *SHARED_SECTIONS, *JOB_SECTIONS[job])
    docs = {(None, f.name): f.metadata["doc"] for f in dataclasses.fields(Config) if f.name in shown}
    for section in (*SHARED_SECTIONS, *JOB_SECTIONS[job]):
        docs.update({(section, f.name): f.metadata["doc"] for f in dataclasses.fields(getattr(cfg, section))})
    seen, comment, section = set(), [], None
    for line in describe(job).splitlines():
        stripped = line.strip()
        if stripped.startswith("# "):
            comment.append(stripped[2:])
        elif stripped:
            key = stripped.split(":", 1)[0]
            where = (section if line.startswith("  ") else None, key)
            if not line.startswith("  "):
                section = key if stripped.endswith(":") else None
            assert " ".join(comment) == " ".join(docs[where].split()), where
            seen.add(where)
            comment = []
        else:
            comment = []
    assert seen == set(docs)


def test_describe_shows_the_docs_and_rejects_an_unknown_job():
    text = describe("dedupe")
    assert "# Jaccard both parts must reach" in text and "\n  threshold: 0.7\n" in text
    assert "\ndedupe:\n" in text and "\ntrain:\n" not in text and "\ningest:\n" not in text
    assert "\npreset: pythia-2.8b\n" in text and "\nenv: local\n" in text
    with pytest.raises(ConfigError, match="unknown job 'nope'"):
        describe("nope")
