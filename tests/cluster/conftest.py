"""A Spark standalone cluster for the ``cluster`` tests: a master and two workers on 127.0.0.1,
each its own JVM (pyspark's ``spark-class``, no downloads), one core and 2g each, started once
per session and stopped at its end (process groups killed); the daemons' and executors' logs stay
under the session's tmp dir and their tails are printed when a submission fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPARK_SUBMIT = Path(sys.executable).with_name("spark-submit")
LOG4J = REPO / "lib" / "dollyflow" / "engine" / "log4j2.properties"


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory):
    pytest.importorskip("pyspark")
    from dollyflow.testing.cluster import StandaloneCluster

    root = tmp_path_factory.mktemp("spark-cluster")
    t0 = time.monotonic()
    cluster = StandaloneCluster(root, workers=2, cores=1, memory="2g", python=sys.executable,
                                pythonpath=str(REPO / "lib")).start()
    cluster.started_in = time.monotonic() - t0
    yield cluster
    cluster.stop()
    print(f"\nspark cluster: started in {cluster.started_in:.1f} s; logs under {root / 'logs'} and "
          f"{root}/worker-*/app-*")


@pytest.fixture(scope="session")
def delta_submit_args():
    """``--packages`` + Delta's two confs for spark-submit, the coordinate engine/jars.py resolves
    (from the Ivy cache the local tests filled)."""
    from dollyflow.engine.jars import DELTA_SQL_CONF, plan_packages

    packages = plan_packages("auto", {})
    if not packages.coordinates:
        why = f"no Delta jars for spark-submit: {packages.reason}"
        if os.environ.get("DOLLYFLOW_REQUIRE_NATIVE") == "1":
            pytest.fail(why)
        pytest.skip(why)
    args = ["--packages", ",".join(packages.coordinates)]
    for k, v in DELTA_SQL_CONF.items():
        args += ["--conf", f"{k}={v}"]
    return args


@pytest.fixture(scope="session")
def submit(spark_cluster, delta_submit_args):
    """submit(script, *args, cwd=..., conf={...}) -> (stdout's JSON document, seconds): one
    ``spark-submit --master spark://...`` with native Delta; a failure shows the driver's output
    and the tail of every daemon's and executor's log."""
    if not SPARK_SUBMIT.is_file():
        pytest.skip(f"no spark-submit beside {sys.executable}")

    def run(script: Path, *args: str, cwd: Path, conf: dict | None = None, timeout: int = 420):
        env = spark_cluster.submit_env()
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        java = f"-Dlog4j2.configurationFile=file:{LOG4J}"
        settings = {"spark.executor.cores": "1", "spark.cores.max": "2", "spark.executor.memory": "1g",
                    "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2",
                    "spark.default.parallelism": "2", "spark.pyspark.python": sys.executable,
                    "spark.executorEnv.PYTHONPATH": str(REPO / "lib"),
                    "spark.executorEnv.TORCH_EXTENSIONS_DIR": os.environ.get(
                        "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
                    "spark.executorEnv.MLFLOW_ALLOW_FILE_STORE": "true",
                    "spark.driver.extraJavaOptions": java, "spark.executor.extraJavaOptions": java,
                    **(conf or {})}
        cmd = [str(SPARK_SUBMIT), "--master", spark_cluster.url, "--driver-memory", "1g", *delta_submit_args]
        for k, v in settings.items():
            cmd += ["--conf", f"{k}={v}"]
        cmd += [str(script), *args]
        t0 = time.monotonic()
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.monotonic() - t0
        assert done.returncode == 0, (f"{' '.join(cmd)}\nexit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n"
                                      f"--- stderr\n{done.stderr[-6000:]}\n{spark_cluster.log_tail(15)}")
        start = done.stdout.find("\n{") + 1 if not done.stdout.startswith("{") else 0
        return json.loads(done.stdout[start:]), seconds

    return run
