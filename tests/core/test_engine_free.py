"""The engine-free core must never import pyspark: it runs in trainers, UDF workers, notebooks."""
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "lib" / "dollyflow" / "core"


def test_core_modules_do_not_import_pyspark():
    modules = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
    assert modules
    code = ("import sys\n" + "".join(f"import dollyflow.core.{m}\n" for m in modules)
            + "import dollyflow.config\n"
            + "bad = [m for m in sys.modules if m == 'pyspark' or m.startswith('pyspark.')]\n"
            + "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_sources_do_not_mention_pyspark_imports():
    for path in CORE.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import pyspark" not in text and "from pyspark" not in text, path
