"""The local session builder (a fresh JVM in a subprocess, as a user's first run gets it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.spark

LIB = Path(__file__).resolve().parents[2] / "lib"

QUIET_RUN = """
from dollyflow.config import SparkConfig
from dollyflow.engine.session import get_session
spark = get_session(SparkConfig(master="local[1]", shuffle_partitions=1, driver_memory="1g"))
print(spark.range(3).count(), flush=True)
# an error from the JVM still reaches stderr
spark.sparkContext._jvm.org.apache.logging.log4j.LogManager.getLogger("dollyflow.check").error("visible-error-line")
spark.stop()
"""


def test_a_local_session_prints_nothing_from_the_jvm_but_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(LIB)}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    out = subprocess.run([sys.executable, "-c", QUIET_RUN], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3"]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ERROR" in lines[0] and lines[0].endswith("visible-error-line"), out.stderr
