"""The README's reference parts stay true: every config key is in the configuration reference,
the bundle's variables are in its table, and the paths and commands it names exist."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from dollyflow.config import Config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(title)
    nxt = re.search(r"^## ", README[start + len(title):], re.M)
    return README[start:start + len(title) + (nxt.start() if nxt else len(README))]


def test_configuration_reference_names_every_key():
    ref = section("### Configuration reference")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `?([a-z ]+?)`? \| [^|]+ \| (.+) \|$", ref, re.M)}
    missing = []
    for f in dataclasses.fields(Config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys = rows.get(f.name, "")
            missing += [f"{f.name}.{g.name}" for g in dataclasses.fields(default) if f"`{g.name}`" not in keys]
        elif f"`{f.name}`" not in rows.get("top level", ""):
            missing.append(f.name)
    assert not missing, f"README's configuration reference lacks {missing}"


def test_bundle_variables_and_jobs_are_documented():
    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    databricks = section("## Databricks")
    assert [v for v in bundle["variables"] if f"`{v}`" not in databricks] == []
    for job in ("dolly_pipeline", "dolly_batch_inference"):
        assert f"`{job}`" in databricks and f"resources/{job}.yml" in databricks
    assert "databricks bundle deploy" in databricks and "databricks bundle run dolly_pipeline -t dev" in databricks


def test_named_paths_exist():
    for cmd in ("bash scripts/run_local.sh", "bash scripts/test.sh"):
        assert cmd in README and (REPO / cmd.split()[1]).is_file()
    for path in set(re.findall(r"`((?:jobs|conf|resources|tests|lib/dollyflow)/[A-Za-z0-9_./-]+)`", README)):
        if "<" in path:
            continue
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
    for preset in ("a100", "a10", "v100", "cpu"):
        assert (REPO / "conf" / "deepspeed" / f"{preset}.json").is_file() and f"`{preset}`" in section("## GPU notes")
