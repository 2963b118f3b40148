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


FALLBACK_RUN = """
import sys
from dollyflow.config import SparkConfig, TablesConfig
from dollyflow.engine import jars
from dollyflow.engine.delta import DeltaStore
from dollyflow.engine.session import get_session
jars.MAVEN_CENTRAL = "http://127.0.0.1:9/maven2"          # nothing listens there: unreachable
spark = get_session(SparkConfig(master="local[1]", shuffle_partitions=1, driver_memory="1g",
                                delta_packages=sys.argv[1], conf={"spark.jars.ivy": sys.argv[2]}))
store = DeltaStore(spark, TablesConfig(warehouse=sys.argv[2] + "/wh"))
print(store.backend, flush=True)
print(store.backend_reason, flush=True)
spark.stop()
"""


@pytest.mark.parametrize("packages, why", [
    ("auto", "is not in the Ivy cache ({ivy}) and Maven Central cannot be reached"),
    ("io.delta:delta-nosuch_2.13:0.0.1", "but the JVM did not start with io.delta:delta-nosuch_2.13:0.0.1 "
                                         "([unresolved dependency: io.delta#delta-nosuch_2.13;0.0.1: not found]"),
], ids=["maven-unreachable", "unresolvable-coordinate"])
def test_without_delta_jars_the_session_starts_offline_and_says_why(tmp_path, packages, why):
    """Delta's jars cannot be had (no network and an empty Ivy cache; a coordinate that does not
    resolve): the session still starts, quickly, without them, and tables.backend=auto uses
    delta-rs with the reason."""
    env = {**os.environ, "PYTHONPATH": str(LIB)}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    ivy = tmp_path / "ivy"
    out = subprocess.run([sys.executable, "-c", FALLBACK_RUN, packages, str(ivy)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    backend, reason = out.stdout.splitlines()
    assert backend == "offline", reason
    assert "not on the driver's classpath" in reason and why.format(ivy=ivy) in reason, reason
    assert reason.endswith("so delta-rs (offline backend)")
