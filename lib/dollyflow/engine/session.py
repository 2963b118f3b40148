"""One SparkSession builder for the three places dollyflow runs.

- Databricks (notebook, job, wheel task): the active session is used as it is.
- spark-submit on a cluster: ``getOrCreate()`` picks up what spark-submit configured; nothing
  the cluster set is overridden.
- local (``python jobs/ingest.py``, tests, the demo): ``local[N]``, quiet (nothing from the JVM
  unless something fails: log4j at ERROR, no shell log-level banner, the JDK's incubator-module
  notice filtered from the JVM's stderr; no progress bar when stderr is not a TTY, no UI unless
  asked), and Python workers get this interpreter and the package's source directory on their
  PYTHONPATH. Delta Lake's jars come along (``spark.delta_packages``,
  :mod:`~dollyflow.engine.jars`) when they can be had; when not, the session starts without them
  and :func:`delta_jars_note` says why (``tables.backend=auto`` then reports it).
"""
from __future__ import annotations

import os
import re
import sys
import threading
from collections import deque
from pathlib import Path

from dollyflow.config import Config, SparkConfig, StorageConfig, on_databricks
from dollyflow.core import object_store
from dollyflow.engine.jars import announce, cached_jar, hadoop_aws_packages, merged_packages, plan_packages

#: What the last local session start did about Delta's jars (None: no local start yet).
_DELTA_JARS_NOTE: str | None = None


def delta_jars_note() -> str | None:
    """Why the local session dollyflow started has (or lacks) Delta's jars; None when dollyflow
    started no session (Databricks, spark-submit, a session the user made)."""
    return _DELTA_JARS_NOTE


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


def uses_s3a(cfg: Config) -> bool:
    """Whether the warehouse or any path of the config is an ``s3a://`` URI."""
    def strings(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from strings(x)
    return any(s.startswith("s3a://") for s in strings(cfg.to_dict()))


def session_for(cfg: Config):
    """:func:`get_session` for a job's whole config: its ``spark:`` section, its ``storage:``
    settings, and hadoop-aws when a path is ``s3a://``."""
    return get_session(cfg.spark, storage=cfg.storage, s3a=uses_s3a(cfg))


def get_session(cfg: SparkConfig | None = None, storage: StorageConfig | None = None, s3a: bool = False):
    """The SparkSession to use: the active one if any, else a new one for where we are.
    ``storage``: the object store's settings, made this process's (and a local session's workers')
    (:func:`~dollyflow.core.object_store.activate`) and given to a local session as ``fs.s3a.*``;
    ``s3a``: a local session also gets hadoop-aws (``storage.hadoop_aws``)."""
    from pyspark.sql import SparkSession

    cfg = cfg or SparkConfig()
    object_store.activate(storage)
    active = SparkSession.getActiveSession()
    if active is not None:
        _register_offline_delta(active)
        return active
    if on_databricks() or under_spark_submit():
        spark = SparkSession.builder.appName(cfg.app_name).getOrCreate()
        _register_offline_delta(spark)
        return spark
    return _local_session(cfg, storage or StorageConfig(), s3a)


def _local_session(cfg: SparkConfig, storage: StorageConfig | None = None, s3a: bool = False):
    from pyspark import SparkContext
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
    }
    s3 = object_store.settings_of(storage)
    if s3 is not None:   # s3a:// with storage:'s endpoint and keys; the workers read $DOLLYFLOW_S3
        settings.update(object_store.hadoop_conf(s3))
        settings["spark.executorEnv." + object_store.ENV] = os.environ[object_store.ENV]
    settings.update(cfg.conf)
    if SparkContext._active_spark_context is None:
        settings = _start_jvm(cfg, settings, hadoop_aws_packages((storage or StorageConfig()).hadoop_aws, s3a))
    builder = SparkSession.builder
    for k, v in settings.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    _register_offline_delta(spark)
    return spark


def _start_jvm(cfg: SparkConfig, settings: dict[str, str],
               extra: tuple[list[str], str] = ([], "")) -> dict[str, str]:
    """Launch the driver JVM and its SparkContext with Delta's jars when they can be had (see
    :mod:`~dollyflow.engine.jars`); if the JVM cannot start with them (a failed resolution), start
    it without them and record why. Returns the settings the session got."""
    global _DELTA_JARS_NOTE
    from pyspark import SparkConf, SparkContext

    _drop_stopped_gateway()
    packages = plan_packages(cfg.delta_packages, dict(cfg.conf))
    if extra[0]:   # hadoop-aws for s3a://
        packages.coordinates += [c for c in extra[0] if c not in packages.coordinates]
        packages.download = packages.download or not all(cached_jar(c, dict(cfg.conf)) for c in extra[0])
        packages.reason += f"; {extra[1]}"
    plain = dict(settings)
    if packages.coordinates:
        settings = {**settings, **packages.conf, "spark.jars.packages": merged_packages(dict(cfg.conf), packages)}
        settings.setdefault("spark.databricks.delta.snapshotPartitions", str(cfg.shuffle_partitions))
        announce(packages, dict(cfg.conf))
    conf = SparkConf(loadDefaults=False).setAll(list(settings.items()))
    try:
        gateway = _quiet_gateway(conf, quiet_ivy=not packages.download)
        _DELTA_JARS_NOTE = packages.reason
    except Exception as exc:
        if not packages.coordinates:
            raise
        text = b"".join(_JVM_STDERR).decode(errors="replace")
        found = re.findall(r"\[unresolved dependency[^\]]*\]", text)
        why = found[-1][:300] if found else f"{type(exc).__name__}: {str(exc)[:200]}"
        _DELTA_JARS_NOTE = (f"{packages.reason}, but the JVM did not start with {', '.join(packages.coordinates)} "
                            f"({why}); started without Delta's jars")
        print(f"dollyflow: {_DELTA_JARS_NOTE}", file=sys.stderr, flush=True)
        settings = plain
        conf = SparkConf(loadDefaults=False).setAll(list(settings.items()))
        gateway = _quiet_gateway(conf)
    SparkContext(conf=conf, gateway=gateway)
    return settings


def _drop_stopped_gateway() -> None:
    """A JVM left by a stopped SparkContext takes no new jars: shut it down so the next start
    launches a fresh one (with this session's ``spark.jars.packages``)."""
    from pyspark import SparkContext

    with SparkContext._lock:
        gateway = SparkContext._gateway
        if gateway is None or SparkContext._active_spark_context is not None:
            return
        SparkContext._gateway = None
        SparkContext._jvm = None
    try:
        gateway.shutdown()
    except Exception:
        pass
    proc = getattr(gateway, "proc", None)
    if proc is not None:
        try:   # PySpark's gateway JVM exits when its stdin closes
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=30)
        except Exception:
            proc.kill()


def stop_local_session(spark) -> None:
    """Stop ``spark`` and the driver JVM dollyflow started for it, so that the next
    :func:`get_session` starts a new JVM (other jars, e.g. with or without Delta)."""
    spark.stop()
    _drop_stopped_gateway()


def resolve_delta_jars() -> tuple[bool, str]:
    """Start (and stop) a local session with ``spark.delta_packages=auto`` so that Delta's jars
    are in the Ivy cache before anything needs them (CI's first step): (native?, why)."""
    spark = get_session(SparkConfig(master="local[1]", shuffle_partitions=1, driver_memory="1g"))
    try:
        found, why = detect_delta(spark)
        return found is True, f"{why}; {delta_jars_note()}"
    finally:
        stop_local_session(spark)


#: Lines the JVM writes to stderr at every start that are not about this run: the JDK's notice
#: for the incubator module Spark 4 adds to every JVM (--add-modules=jdk.incubator.vector).
JVM_START_NOTICES = (re.compile(rb"^WARNING: Using incubator modules: "),)


#: The start and the end of the report Spark's Ivy prints when it resolves ``spark.jars.packages``.
_IVY_START = re.compile(rb"^(:: loading settings :: |Ivy Default Cache set to: )")
_IVY_END = re.compile(rb"^\s+\d+ artifacts copied, \d+ already retrieved")
#: The JVM's latest stderr lines (the reason a start failed).
_JVM_STDERR: deque = deque(maxlen=200)


def _quiet_gateway(conf, quiet_ivy: bool = True):
    """Launch the local driver JVM (as PySpark does) with its stderr piped through a thread
    that forwards every line to our stderr except :data:`JVM_START_NOTICES` and, when
    ``quiet_ivy`` (the packages are cached), Ivy's resolution report: errors, stack traces and
    Python worker output still come through, the start-up chatter does not."""
    from pyspark.java_gateway import launch_gateway

    _JVM_STDERR.clear()
    # The reader starts before the JVM: Ivy's report comes before the gateway's port, and a full
    # pipe would block the JVM while launch_gateway waits for that port.
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(target=_forward_stderr, args=(os.fdopen(read_fd, "rb"), quiet_ivy),
                              name="dollyflow-jvm-stderr", daemon=True)
    reader.start()
    try:
        return launch_gateway(conf, popen_kwargs={"stderr": write_fd})
    except BaseException:
        os.close(write_fd)
        write_fd = None
        reader.join(timeout=10)   # the JVM exited: its last lines say why
        raise
    finally:
        if write_fd is not None:
            os.close(write_fd)   # the JVM holds its own copy; EOF comes when it exits


def _forward_stderr(stream, quiet_ivy: bool = True) -> None:
    in_ivy = False
    for line in iter(stream.readline, b""):
        _JVM_STDERR.append(line)
        if any(p.match(line) for p in JVM_START_NOTICES):
            continue
        if quiet_ivy and (in_ivy or _IVY_START.match(line)):
            in_ivy = not _IVY_END.match(line)
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
