"""One SparkSession builder for the three places dollyflow runs.

- Databricks (notebook, job, wheel task): the active session is used as it is.
- spark-submit on a cluster: ``getOrCreate()`` picks up what spark-submit configured; nothing
  the cluster set is overridden.
- local (``python jobs/ingest.py``, tests, the demo): ``local[N]``, quiet (nothing from the JVM
  unless something fails: log4j at ERROR, no shell log-level banner, the JDK's incubator-module
  notice filtered from the JVM's stderr; no progress bar when stderr is not a TTY, no UI unless
  asked), and Python workers get this interpreter and the package's source directory on their
  PYTHONPATH.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from dollyflow.config import SparkConfig, on_databricks


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


def executor_layout(spark) -> tuple[int, int]:
    """(executors, cores per executor) of the session: ``local[N]`` is one executor of N cores
    (``local[*]``: every core of this machine); a cluster's executors are counted from the block
    managers (the driver's left out), their cores from ``spark.executor.cores``, else the
    default parallelism spread over them. (1, 1) when unknown (Spark Connect)."""
    master = master_of(spark)
    try:
        sc = spark.sparkContext
        parallelism = int(sc.defaultParallelism)
    except Exception:
        return 1, 1
    m = re.match(r"local\[(\d+|\*)", master)
    if master == "local":
        return 1, 1
    if m:   # local[N]: N cores (the default parallelism may be set to something else)
        return 1, (os.cpu_count() or 1) if m.group(1) == "*" else max(1, int(m.group(1)))
    try:
        executors = max(1, int(sc._jsc.sc().getExecutorMemoryStatus().size()) - 1)
    except Exception:
        executors = 1
    cores = sc.getConf().get("spark.executor.cores", "")
    return executors, max(1, int(cores) if cores.isdigit() else parallelism // executors)


def task_count(spark, configured: int) -> int:
    """The tasks a job spreads its rows over: ``configured`` when set (a job's ``partitions``
    key), else the session's default parallelism (its conf on Spark Connect)."""
    if configured:
        return int(configured)
    try:
        return int(spark.sparkContext.defaultParallelism)
    except Exception:   # Spark Connect
        return int(spark.conf.get("spark.default.parallelism", "8") or 8)


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
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    lib = _package_root()
    pythonpath = os.pathsep.join(p for p in [lib, os.environ.get("PYTHONPATH", "")] if p)
    # Workers must run this interpreter and import this checkout's package.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ["PYTHONPATH"] = pythonpath
    # Quiet JVM start: only errors from log4j (our properties also keep Spark's shell-style
    # "Setting default log level" banner away).
    log4j = Path(__file__).with_name("log4j2.properties")
    java_opts = f"-Dlog4j2.configurationFile=file:{log4j} -Dlog4j.configurationFile=file:{log4j}"
    settings = {
        "spark.master": cfg.master,
        "spark.app.name": cfg.app_name,
        "spark.driver.memory": cfg.driver_memory,
        "spark.driver.extraJavaOptions": java_opts,
        "spark.executor.extraJavaOptions": java_opts,
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.default.parallelism": str(cfg.shuffle_partitions),
        "spark.ui.enabled": str(cfg.ui).lower(),
        "spark.ui.showConsoleProgress": str(sys.stderr.isatty() and cfg.ui).lower(),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.executorEnv.PYTHONPATH": pythonpath,
        "spark.python.worker.reuse": "true",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        **cfg.conf,
    }
    if SparkContext._active_spark_context is None:
        conf = SparkConf(loadDefaults=False).setAll(list(settings.items()))
        SparkContext(conf=conf, gateway=_quiet_gateway(conf))
    builder = SparkSession.builder
    for k, v in settings.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    _register_offline_delta(spark)
    return spark


#: Lines the JVM writes to stderr at every start that are not about this run: the JDK's notice
#: for the incubator module Spark 4 adds to every JVM (--add-modules=jdk.incubator.vector).
JVM_START_NOTICES = (re.compile(rb"^WARNING: Using incubator modules: "),)


def _quiet_gateway(conf):
    """Launch the local driver JVM (as PySpark does) with its stderr piped through a thread
    that forwards every line to our stderr except :data:`JVM_START_NOTICES`: errors, stack
    traces and Python worker output still come through, the start-up notice does not."""
    from pyspark.java_gateway import launch_gateway

    gateway = launch_gateway(conf, popen_kwargs={"stderr": subprocess.PIPE})
    stream = gateway.proc.stderr
    threading.Thread(target=_forward_stderr, args=(stream,), name="dollyflow-jvm-stderr", daemon=True).start()
    return gateway


def _forward_stderr(stream) -> None:
    for line in iter(stream.readline, b""):
        if any(p.match(line) for p in JVM_START_NOTICES):
            continue
        try:
            os.write(2, line)
        except OSError:
            pass


def detect_delta(spark) -> tuple[bool | None, str]:
    """Whether Delta Lake's JVM classes are on this session's classpath, and why we think so:
    (True, why), (False, why) when they are certainly absent, (None, why) when it could not be
    checked (no JVM access, as under Spark Connect, or the check itself failed)."""
    if on_databricks():
        return True, "Databricks runtime (DATABRICKS_RUNTIME_VERSION is set)"
    try:
        jvm = spark.sparkContext._jvm  # not available under Spark Connect
        if jvm is None:
            raise RuntimeError("the session has no JVM gateway")
    except Exception as exc:
        return None, f"this session's JVM cannot be inspected ({type(exc).__name__}: {str(exc)[:200]})"
    try:
        jvm.java.lang.Class.forName("io.delta.tables.DeltaTable", False,
                                    jvm.java.lang.Thread.currentThread().getContextClassLoader())
        return True, "Delta Lake's JVM classes (io.delta.tables.DeltaTable) are on the driver's classpath"
    except Exception as exc:
        text = str(exc)
        if "ClassNotFoundException" in text or "NoClassDefFoundError" in text:
            return False, "Delta Lake's JVM classes (io.delta.tables.DeltaTable) are not on the driver's classpath"
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        return None, f"the check for Delta's JVM classes failed ({type(exc).__name__}: {first})"


def _register_offline_delta(spark) -> None:
    """Register the delta-rs data source as ``delta`` when the JVM certainly has no Delta."""
    if getattr(spark, "_dollyflow_delta_checked", False):
        return
    spark._dollyflow_delta_checked = True
    found = detect_delta(spark)[0]
    spark._dollyflow_native_delta = found is True
    if found is not False:
        return
    try:
        from dollyflow.engine.delta.offline_source import DeltaRsDataSource
    except ImportError:  # deltalake not installed: native Delta only
        return
    spark.dataSource.register(DeltaRsDataSource)
