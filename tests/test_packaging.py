"""The wheel a Databricks bundle installs: conf/ inside it, one console script per job."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_conf_and_entry_points(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("dollyflow-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "dollyflow/_conf/defaults.yaml" in names
        assert "dollyflow/_conf/model/pythia-2.8b.yaml" in names
        assert "dollyflow/engine/log4j2.properties" in names
        assert not any(n.startswith("pyspark") for n in names)
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    for job in ("ingest", "dedupe", "filter", "tokenize", "train", "infer"):
        assert f"dollyflow-{job} = dollyflow.cli:{job}" in entry
    assert "dollyflow = dollyflow.cli:main" in entry
    requires = [l for l in meta.splitlines() if l.startswith("Requires-Dist:")]
    hard = [l for l in requires if "extra ==" not in l]
    assert not any("pyspark" in l or "torch" in l for l in hard)      # extras only
    assert any("pyspark" in l and 'extra == "spark"' in l for l in requires)
    assert any("presidio-analyzer" in l and 'extra == "filter"' in l for l in requires)


@pytest.mark.parametrize("job", ["ingest", "dedupe", "filter", "tokenize", "train", "infer"])
def test_spark_submit_scripts_start(job):
    """jobs/<job>.py run as scripts (sys.path[0] = jobs/, where tokenize.py would shadow the
    standard library's tokenize) must start and parse arguments."""
    out = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), "--help"], cwd=REPO / "jobs",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"dollyflow {job}" in out.stdout
