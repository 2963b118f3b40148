"""The engine-free core must never import pyspark: it runs in trainers, UDF workers, notebooks."""
import subprocess
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "lib"
CORE = LIB / "dollyflow" / "core"


def core_modules() -> list[str]:
    """Every module under core/ (packages included), as dotted names."""
    out = []
    for p in sorted(CORE.rglob("*.py")):
        parts = p.relative_to(LIB).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def test_core_modules_do_not_import_pyspark():
    modules = core_modules()
    assert "dollyflow.core.training.loop" in modules
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "import dollyflow.config\nimport dollyflow.launch\nimport dollyflow.launch.torchrun\n"
            + "import dollyflow.launch.common\n"
            + "bad = [m for m in sys.modules if m == 'pyspark' or m.startswith('pyspark.')]\n"
            + "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_sources_do_not_mention_pyspark_imports():
    for path in list(CORE.rglob("*.py")) + [LIB / "dollyflow" / "launch" / "torchrun.py",
                                            LIB / "dollyflow" / "launch" / "common.py"]:
        text = path.read_text(encoding="utf-8")
        assert "import pyspark" not in text and "from pyspark" not in text, path
