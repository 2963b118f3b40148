"""Every import of dollyflow's own modules points down the layers, and none forms a cycle.

    config -> core -> engine | launch -> jobs | testing -> app (cli, pipeline, runs, summaries,
    quickstart, report)

The imports are read from the sources with ``ast``, function-level ones included (that is where
cycles hide). An own-module import may sit inside a function only when the module it imports
pulls in a heavy third-party library (pyspark, torch, ...) as it loads: deferring it is deferring
that library. The runtime checks import the layers that must work without Spark (core, config,
launch, and the ``dollyflow`` command itself: ``dollyflow train --no-spark`` on a GPU box).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
PACKAGE = "dollyflow"
HEAVY = {"pyspark", "torch", "transformers", "deepspeed", "peft", "mlflow", "horovod", "matplotlib",
         "ctranslate2", "lm_eval", "delta"}
# layer of each top-level part of the package; parts not named here are the app (cli, pipeline, ...)
LAYERS = {"config": 0, "core": 1, "engine": 2, "launch": 2, "jobs": 3, "testing": 3}
APP = 4
# config may reuse exactly these leaves of core (they import nothing of dollyflow)
CONFIG_MAY_IMPORT = {"dollyflow.core.split"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    rel: str = ""
    imports: list = field(default_factory=list)   # (target module, line, inside a function)
    third_party_top: set = field(default_factory=set)


def discover(lib: Path = LIB) -> dict[str, Module]:
    mods = {}
    for p in sorted((lib / PACKAGE).rglob("*.py")):
        parts = p.relative_to(lib).with_suffix("").parts
        pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if pkg else parts)
        mods[name] = Module(name, p, pkg, p.relative_to(lib).as_posix())
    for m in mods.values():
        m.imports, m.third_party_top = _imports(m, mods)
    return mods


def _resolve(m: Module, node) -> list[str]:
    """The dotted names an import statement may load, most specific first per name."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = m.name.split(".")
        if not m.is_package:
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [f"{mod}.{a.name}" for a in node.names] + [mod]


def _owner(name: str, mods: dict) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def _imports(m: Module, mods: dict) -> tuple[list, set]:
    tree = ast.parse(m.path.read_text(encoding="utf-8"), filename=str(m.path))
    nested = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for n in ast.walk(fn):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    nested.add(id(n))
    out, third = [], set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names = _resolve(m, node)
        inside = id(node) in nested
        own = set()
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _owner(name, mods)
                if target and target != m.name:
                    own.add(target)
            elif not inside and not (isinstance(node, ast.ImportFrom) and node.level):
                third.add(name.split(".")[0])
        # `from pkg import sub` loads pkg and sub; keep the most specific modules only
        own = {t for t in own if not any(o != t and o.startswith(t + ".") for o in own)} or own
        out.extend((t, node.lineno, inside) for t in sorted(own))
    return out, third


def layer(name: str) -> tuple[str, int]:
    parts = name.split(".")
    if len(parts) == 1:
        return "app", APP
    return (parts[1], LAYERS[parts[1]]) if parts[1] in LAYERS else ("app", APP)


def heavy_at_load(name: str, mods: dict, seen=None) -> bool:
    """Whether importing ``name`` imports a heavy third-party library (its own top-level imports,
    followed through dollyflow's modules)."""
    seen = set() if seen is None else seen
    if name in seen:
        return False
    seen.add(name)
    m = mods[name]
    if m.third_party_top & HEAVY:
        return True
    return any(heavy_at_load(t, mods, seen) for t, _, inside in m.imports if not inside)


def upward_imports(mods: dict) -> list[str]:
    bad = []
    for m in mods.values():
        group, rank = layer(m.name)
        for target, line, _ in m.imports:
            tgroup, trank = layer(target)
            if group == "config" and target in CONFIG_MAY_IMPORT:
                continue
            if trank > rank or (trank == rank and tgroup != group):
                bad.append(f"{m.rel}:{line}: {m.name} ({group}) imports {target} ({tgroup})")
    return bad


def function_level_imports(mods: dict) -> list[str]:
    return [f"{m.rel}:{line}: {m.name} imports {target} inside a function"
            for m in mods.values() for target, line, inside in m.imports
            if inside and not heavy_at_load(target, mods)]


def cycles(mods: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    graph = {n: sorted({t for t, _, _ in m.imports}) for n, m in mods.items()}
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


MODS = discover()


def test_the_layers_are_known():
    assert {"dollyflow.config", "dollyflow.core.storage", "dollyflow.engine.session", "dollyflow.launch.common",
            "dollyflow.jobs.train", "dollyflow.cli", "dollyflow.pipeline"} <= set(MODS)
    for name in MODS:
        assert layer(name)[1] in (0, 1, 2, 3, APP)


def test_no_upward_import():
    bad = upward_imports(MODS)
    assert not bad, "imports pointing up the layers:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(MODS)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_own_imports_at_module_top():
    bad = function_level_imports(MODS)
    assert not bad, "own-module imports inside functions (move them to the module top):\n" + "\n".join(bad)


def test_config_reuses_only_leaves_of_core():
    for leaf in CONFIG_MAY_IMPORT:
        assert not MODS[leaf].imports, f"{leaf} must stay a leaf: it imports {MODS[leaf].imports}"


# --- the checks themselves catch what they are for ---------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        p = tmp_path / PACKAGE / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return discover(tmp_path)


def test_checks_find_cycles_upward_and_hidden_imports(tmp_path):
    mods = _tree(tmp_path, {
        "__init__.py": "", "cli.py": "import dollyflow.pipeline\n",
        "pipeline.py": "def f():\n    from dollyflow.cli import main\n",
        "core/__init__.py": "", "core/a.py": "from dollyflow.engine.b import x\n",
        "core/heavy.py": "import torch\n",
        "core/user.py": "def f():\n    from dollyflow.core import heavy\n",
        "engine/__init__.py": "", "engine/b.py": "from ..core import a\n",
        "launch/__init__.py": "", "launch/c.py": "from dollyflow.engine import b\n",
    })
    assert cycles(mods) == [["dollyflow.cli", "dollyflow.pipeline"], ["dollyflow.core.a", "dollyflow.engine.b"]]
    up = upward_imports(mods)
    assert any("dollyflow.core.a (core) imports dollyflow.engine.b" in u for u in up)
    assert any("dollyflow.launch.c (launch) imports dollyflow.engine.b" in u for u in up)
    assert not any("engine.b (engine) imports" in u for u in up)
    hidden = function_level_imports(mods)
    assert hidden == ["dollyflow/pipeline.py:2: dollyflow.pipeline imports dollyflow.cli inside a function"]


# --- runtime: what must import without Spark ----------------------------------------------------

def _loaded_after(code: str) -> list[str]:
    probe = (code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(LIB), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_core_config_and_launch_never_import_pyspark():
    names = [n for n in MODS if layer(n)[0] in ("core", "config", "launch") and not n.endswith("torch_distributor")
             and not n.endswith("horovod")]
    assert "dollyflow.core.training.loop" in names
    loaded = _loaded_after("\n".join(f"import {n}" for n in names))
    assert "pyspark" not in loaded


def test_core_sources_never_name_pyspark():
    for name, m in MODS.items():
        if layer(name)[0] in ("core", "config"):
            text = m.path.read_text(encoding="utf-8")
            assert "import pyspark" not in text and "from pyspark" not in text, m.path


@pytest.mark.parametrize("module", ["dollyflow.cli", "dollyflow.launch.torchrun"])
def test_the_command_loads_without_spark_or_torch(module):
    """``dollyflow --help``, ``dollyflow train --no-spark`` on a GPU box without Spark, and the
    torchrun worker entry load neither pyspark nor torch until a job needs them."""
    loaded = _loaded_after(f"import {module}")
    assert "pyspark" not in loaded and "torch" not in loaded
