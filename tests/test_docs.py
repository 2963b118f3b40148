"""The documentation stays true: README.md, docs/*.md and bench/README.md.

Each check reads the section it checks: every config key is in docs/configuration.md's reference,
the bundle's variables and jobs are in docs/deploying.md, the DeepSpeed presets in
docs/training.md's GPU notes, the README's layout tree is lib/dollyflow's, the README's Python
snippet runs, the CLI subcommands and bench flags the docs show exist, every path, module and link
they name exists, and the README's benchmark table agrees with bench/README.md.
bench/HISTORY.md is a dated record, kept verbatim: it is not checked.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import io
import re
from pathlib import Path

import pytest
import yaml

from dollyflow.cli import main as cli_main
from dollyflow.config import Config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
BENCH = REPO / "bench" / "README.md"
CHECKED = [README, *DOCS, BENCH]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def section(path: Path, title: str) -> str:
    """From the heading ``title`` to the next heading of the same or a higher level (a ``#``
    line inside a code block is no heading)."""
    lines = read(path).splitlines()
    start = lines.index(title)
    level = len(title) - len(title.lstrip("#"))
    fenced, end = False, len(lines)
    for i in range(start + 1, len(lines)):
        fenced ^= lines[i].lstrip().startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", lines[i]):
            end = i
            break
    return "\n".join(lines[start:end]) + "\n"


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def test_the_reference_files_exist():
    assert {p.name for p in DOCS} >= {"configuration.md", "jobs.md", "training.md", "inference.md", "delta.md",
                                      "deploying.md", "evaluation.md"}
    assert (REPO / "bench" / "HISTORY.md").is_file()
    assert len(read(README).splitlines()) <= 260, "the README is for a newcomer: reference goes to docs/"


# --- docs/configuration.md -------------------------------------------------------------------


def test_configuration_reference_names_every_key():
    ref = section(REPO / "docs" / "configuration.md", "## Configuration reference")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `?([a-z ]+?)`? \| [^|]+ \| (.+) \|$", ref, re.M)}
    missing = []
    for f in dataclasses.fields(Config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys = rows.get(f.name, "")
            missing += [f"{f.name}.{g.name}" for g in dataclasses.fields(default) if f"`{g.name}`" not in keys]
        elif f"`{f.name}`" not in rows.get("top level", ""):
            missing.append(f.name)
    assert not missing, f"docs/configuration.md's reference lacks {missing}"


# --- docs/deploying.md and the README's Databricks part ----------------------------------------


def test_bundle_variables_and_jobs_are_documented():
    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    databricks = section(REPO / "docs" / "deploying.md", "## Databricks")
    assert [v for v in bundle["variables"] if f"`{v}`" not in databricks] == []
    for job in ("dolly_pipeline", "dolly_batch_inference"):
        assert f"`{job}`" in databricks and f"resources/{job}.yml" in databricks
        assert (REPO / "resources" / f"{job}.yml").is_file()
    for text in (databricks, read(README)):
        assert "databricks bundle deploy" in text and "databricks bundle run dolly_pipeline -t dev" in text


# --- docs/training.md --------------------------------------------------------------------------


def test_deepspeed_presets_are_documented():
    notes = section(REPO / "docs" / "training.md", "## GPU notes")
    for preset in ("a100", "a10", "v100", "cpu"):
        assert (REPO / "conf" / "deepspeed" / f"{preset}.json").is_file() and f"`{preset}`" in notes
    documented = set(re.findall(r"`(\w+)` \(", notes))
    shipped = {p.stem for p in (REPO / "conf" / "deepspeed").glob("*.json")}
    assert shipped <= documented, f"DeepSpeed presets not in docs/training.md: {shipped - documented}"


# --- every file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", CHECKED, ids=lambda p: str(p.relative_to(REPO)))
def test_named_paths_exist(doc):
    text = read(doc)
    for path in set(re.findall(r"`((?:jobs|conf|resources|tests|scripts|bench|docs|lib/dollyflow)/"
                               r"[A-Za-z0-9_./-]+)`", text)):
        if "<" in path:
            continue
        assert (REPO / path).exists(), f"{doc.relative_to(REPO)} names {path}, which does not exist"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):        # relative links
        assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"


@pytest.mark.parametrize("doc", CHECKED, ids=lambda p: str(p.relative_to(REPO)))
def test_named_modules_exist(doc):
    """Every ``dollyflow.x.y[.name]`` the docs name imports (the module, or the module's attribute)."""
    for dotted in sorted(set(re.findall(r"(?<![\w./])dollyflow(?:\.[A-Za-z_]\w*)+", read(doc)))):
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.startswith("dollyflow") and ".".join(parts[:i]).startswith(exc.name):
                    continue
                raise
            for attr in parts[i:]:
                assert hasattr(obj, attr), f"{doc.relative_to(REPO)} names {dotted}: {obj.__name__} has no {attr}"
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"{doc.relative_to(REPO)} names {dotted}, which does not import")


def test_the_two_commands():
    text = read(README)
    for cmd in ("bash scripts/run_local.sh", "bash scripts/test.sh"):
        assert cmd in section(README, "## The two commands") and (REPO / cmd.split()[1]).is_file()
    # what command 1 prints: one line per job, then the report's path
    assert re.search(r"^\[5/7\] train    done in .* tokens/s", text, re.M)
    assert re.search(r"^\[6/7\] infer    done in .*\| predictions", text, re.M)
    assert re.search(r"^\[7/7\] evaluate done in .* headline .*\| eval_records", text, re.M)
    assert re.search(r"^report \([\d.]+ s\): warehouse/reports/pipeline-\S+\.html$", text, re.M)


def test_documented_cli_commands_exist():
    """Every ``dollyflow <command>`` in the docs' shell blocks is one the CLI knows: its
    ``--help`` succeeds, where an unknown command exits 2."""
    commands = set()
    for doc in CHECKED:
        for block in code_blocks(read(doc), "bash"):
            commands |= set(re.findall(r"\bdollyflow (\w+)", block))
    assert {"ingest", "dedupe", "tokenize", "train", "infer", "pipeline", "config", "report"} <= commands
    for cmd in sorted(commands):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                rc = cli_main([cmd, "--help"])
            except SystemExit as exc:
                rc = exc.code
        assert rc in (0, None), f"dollyflow {cmd} --help exited {rc}"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(["no-such-command"]) == 2       # the check above can fail


def test_bench_commands_use_real_flags():
    """The commands in bench/README.md and the benchmarks' names in its table run the bench
    scripts with flags those scripts define."""
    text = read(BENCH)
    runs = re.findall(r"bench/(\w+)\.py((?: --[\w-]+(?: [^\s`|#-][^\s`|#]*)?)*)", text)
    assert {name for name, _ in runs} >= {"ingest", "dedupe", "tokenize", "train", "infer"}
    for name, args in runs:
        script = REPO / "bench" / f"{name}.py"
        assert script.is_file(), f"bench/README.md names bench/{name}.py"
        source = read(script)
        for flag in re.findall(r"--[\w-]+", args):
            assert f'"{flag}"' in source, f"bench/{name}.py has no {flag}"


def test_readme_benchmark_table_matches_bench_readme():
    """ONE table of current figures in the README, each dated, on a named machine, and each
    figure the same as bench/README.md's latest."""
    bench = section(README, "## Benchmarks")
    assert "2 CPU cores" in bench and "no GPU" in bench
    rows = re.findall(r"^\| (\w+) \| (\d{4}-\d\d-\d\d) \| .* \| (.+) \|$", bench, re.M)
    assert {job for job, _, _ in rows} == {"ingest", "dedupe", "filter", "tokenize", "train", "infer", "evaluate"}
    latest = section(BENCH, "## Latest figures")
    for job, date, result in rows:
        mine = [line for line in latest.splitlines() if line.startswith(f"| `bench/{job}.py")]
        assert any(date in line for line in mine), f"{job}: {date} is not bench/README.md's date"
        for figure in re.findall(r"\d+\.\d+", result):
            assert any(figure in line for line in mine), f"{job}: {figure} is not in bench/README.md"


# --- the README ---------------------------------------------------------------------------------


def test_layout_tree_is_the_package():
    """Every folder and file in the README's layout tree exists (with the files its description
    names, such as config/'s schema.py), and every package and top module of lib/dollyflow is in it."""
    block = next(b for b in code_blocks(section(README, "## Layout"), "") if b.startswith("lib/dollyflow/"))
    root, named, entries = REPO / "lib" / "dollyflow", set(), []
    for line in block.splitlines()[1:]:
        m = re.match(r"^( {2}| {4})([\w.]+/?)(?:\s|$)", line)
        if m:                                     # an entry: "  config/   0  what it holds"
            top = [path for path, depth, _ in entries if depth == 1]
            path = (root if len(m.group(1)) == 2 else top[-1]) / m.group(2)
            entries.append((path, len(m.group(1)) // 2, [line[m.end():]]))
        elif entries and re.match(r"^ {8,}\S", line):   # its description continued
            entries[-1][2].append(line)
        else:                                     # a line outside lib/ (jobs/<job>.py, conf/, ...)
            entries.append((None, 0, []))
    for path, _, text in [e for e in entries if e[0] is not None]:
        assert path.exists(), f"README's layout names {path.relative_to(REPO)}, which does not exist"
        named.add(path)
        if path.is_dir():
            for name in re.findall(r"\b(\w+\.py)\b", " ".join(text)):
                assert (path / name).is_file(), f"README's layout names {path.relative_to(REPO)}/{name}"
    packages = {p.parent for p in root.rglob("__init__.py") if p.parent != root and "__pycache__" not in p.parts}
    modules = {p for p in root.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    missing = sorted(str(p.relative_to(root)) for p in (packages | modules) - named)
    assert not missing, f"not in README's layout: {missing}"


@pytest.mark.spark
def test_readme_python_snippet_runs(tmp_path, spark):
    """The README's ``load_config`` + ``register_udf`` snippet runs as written, against a model
    directory in place of the Volume path and, as ``spark``, a stand-in that records what it is
    asked (the real session only has to exist: the UDF's return type is parsed by Spark)."""
    (snippet,) = code_blocks(section(README, "## Running jobs"), "python")
    tree = ast.parse(snippet)
    imported = {(n.module, a.name) for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {("dollyflow.config", "load_config"), ("dollyflow.engine.infer", "register_udf")} <= imported
    volume_model = re.search(r'"infer\.model=([^"]+)"', snippet).group(1)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")

    class Spark:
        def __init__(self):
            self.registered, self.queries = {}, []
            self.udf = self

        def register(self, name, fn):
            self.registered[name] = fn

        def sql(self, query):
            self.queries.append(query)

    stand_in = Spark()
    scope = {"spark": stand_in}
    exec(compile(snippet.replace(volume_model, str(model)), "README.md", "exec"), scope)   # noqa: S102
    assert scope["cfg"].env == "databricks" and scope["cfg"].infer.model == str(model)
    assert list(stand_in.registered) == ["dolly_generate"]
    assert stand_in.queries and all("dolly_generate(" in q for q in stand_in.queries)
