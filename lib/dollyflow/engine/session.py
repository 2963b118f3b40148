"""One SparkSession builder for the three places dollyflow runs.

- Databricks (notebook, job, wheel task): the active session is used as it is.
- spark-submit on a cluster: ``getOrCreate()`` picks up what spark-submit configured; nothing
  the cluster set is overridden.
- local (``python jobs/ingest.py``, tests, the demo): ``local[N]``, quiet (no JVM log spam, no
  progress bar when stderr is not a TTY, no UI unless asked), and Python workers get this
  interpreter and the package's source directory on their PYTHONPATH.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dollyflow.config import SparkConfig


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def under_spark_submit() -> bool:
    """True when this driver was launched by spark-submit (it sets these for the Python driver)."""
    return os.environ.get("PYSPARK_GATEWAY_PORT") is not None


def master_of(spark) -> str:
    """The session's master URL (``local[2]``, ``yarn``, ``spark://...``; "" when unknown, as
    under Spark Connect, which is then treated as a remote cluster)."""
    try:
        return spark.sparkContext.master
    except Exception:
        try:
            return spark.conf.get("spark.master", "")
        except Exception:
            return ""


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])  # .../lib, the directory holding dollyflow/


def get_session(cfg: SparkConfig | None = None):
    """The SparkSession to use: the active one if any, else a new one for where we are."""
    from pyspark.sql import SparkSession

    cfg = cfg or SparkConfig()
    active = SparkSession.getActiveSession()
    if active is not None:
        _register_offline_delta(active)
        return active
    if on_databricks() or under_spark_submit():
        spark = SparkSession.builder.appName(cfg.app_name).getOrCreate()
        _register_offline_delta(spark)
        return spark
    return _local_session(cfg)


def _local_session(cfg: SparkConfig):
    from pyspark.sql import SparkSession

    lib = _package_root()
    pythonpath = os.pathsep.join(p for p in [lib, os.environ.get("PYTHONPATH", "")] if p)
    # Workers must run this interpreter and import this checkout's package.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ["PYTHONPATH"] = pythonpath
    # Quiet JVM start: only errors from log4j, no "Setting default log level" banner.
    log4j = Path(__file__).with_name("log4j2.properties")
    java_opts = f"-Dlog4j2.configurationFile=file:{log4j} -Dlog4j.configurationFile=file:{log4j}"
    builder = (SparkSession.builder.master(cfg.master).appName(cfg.app_name)
               .config("spark.driver.memory", cfg.driver_memory)
               .config("spark.driver.extraJavaOptions", java_opts)
               .config("spark.executor.extraJavaOptions", java_opts)
               .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
               .config("spark.default.parallelism", str(cfg.shuffle_partitions))
               .config("spark.ui.enabled", str(cfg.ui).lower())
               .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty() and cfg.ui).lower())
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.executorEnv.PYTHONPATH", pythonpath)
               .config("spark.python.worker.reuse", "true")
               .config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1"))
    for k, v in cfg.conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    _register_offline_delta(spark)
    return spark


def jvm_has_delta(spark) -> bool:
    """Whether Delta Lake's JVM classes are on this session's classpath (Databricks always)."""
    if on_databricks():
        return True
    try:
        jvm = spark.sparkContext._jvm  # not available under Spark Connect
        jvm.java.lang.Class.forName("io.delta.tables.DeltaTable", False,
                                    jvm.Thread.currentThread().getContextClassLoader())
        return True
    except Exception:
        return False


def _register_offline_delta(spark) -> None:
    """Register the delta-rs data source as ``delta`` when the JVM has no Delta of its own."""
    if getattr(spark, "_dollyflow_delta_checked", False):
        return
    spark._dollyflow_delta_checked = True
    if jvm_has_delta(spark):
        spark._dollyflow_native_delta = True
        return
    spark._dollyflow_native_delta = False
    try:
        from dollyflow.engine.delta_rs import DeltaRsDataSource
    except ImportError:  # deltalake not installed: native Delta only
        return
    spark.dataSource.register(DeltaRsDataSource)
