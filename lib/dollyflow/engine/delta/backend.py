"""The interface both Delta backends implement, and the choice between them (``tables.backend``).

- native (:class:`~dollyflow.engine.delta.native.NativeBackend`): the JVM has Delta.
- offline (:class:`~dollyflow.engine.delta.offline.OfflineBackend`): Spark's Parquet writer and
  delta-rs.

:class:`~dollyflow.engine.delta.store.DeltaStore` resolves names, checks arguments and makes the
write ids; the backend it picked at construction does the table work.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import pyarrow as pa

from dollyflow.config import TablesConfig
from dollyflow.engine.delta.commit import Commit
from dollyflow.engine.delta.legacy_log import UPGRADE_COMMAND, describe, legacy_tables
from dollyflow.engine.delta.parts import PartSink
from dollyflow.engine.delta.refs import TableRef, schema_location
from dollyflow.engine.session import delta_jars_note, detect_delta, master_of

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The asked-for backend cannot serve these tables (no Delta jars for ``native``, logs Delta
    Spark cannot parse, a cluster where ``auto`` cannot tell): the message says what to do."""


def choose_backend(spark, requested: str) -> tuple[bool, str]:
    """(native?, why) for ``tables.backend``: ``offline`` as asked; ``native`` only when Delta's
    JVM classes are there (a clear error otherwise); ``auto`` native when they are, offline when
    they are certainly not. When the check itself fails, ``auto`` uses the offline backend on a
    local master (with a warning) and refuses to guess on a cluster."""
    if requested == "offline":
        return False, "tables.backend=offline"
    found, why = detect_delta(spark)
    if requested == "native":
        if found is False:
            note = delta_jars_note()
            raise BackendError(
                f"tables.backend=native, but {why}{f' ({note})' if note else ''}. Locally set "
                "spark.delta_packages=auto (the default) with Maven Central or the Ivy cache at hand; or start "
                "Spark with Delta Lake (spark-submit --packages io.delta:delta-spark_<spark x.y>_2.13:<version> --conf spark.sql.extensions=io.delta.sql."
                "DeltaSparkSessionExtension --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql."
                "delta.catalog.DeltaCatalog), or set tables.backend=offline (delta-rs) or auto")
        return True, f"tables.backend=native; {why}"
    if found is True:
        return True, f"tables.backend=auto: {why}"
    if found is False:
        note = delta_jars_note()
        return False, f"tables.backend=auto: {why}{f' ({note})' if note else ''}, so delta-rs (offline backend)"
    master = master_of(spark)
    if not master.startswith("local"):
        raise BackendError(f"tables.backend=auto cannot tell whether this session has Delta Lake: {why}. "
                           "Set tables.backend=native (the cluster has Delta) or tables.backend=offline")
    reason = f"tables.backend=auto: {why}; local master {master}, so delta-rs (offline backend)"
    log.warning("dollyflow: %s", reason)
    return False, reason


def check_legacy_logs(tables: TablesConfig, native: bool, reason: str) -> tuple[bool, str]:
    """Native Delta, when chosen for path-based tables, only if no table under the schema location
    has commits that dollyflow's offline backend wrote before it kept the job name in userMetadata
    (a top-level ``job`` in commitInfo: Delta Spark cannot parse those logs). ``auto`` then uses
    the offline backend (delta-rs reads them), saying which tables and how to move on;
    ``native`` fails before Spark touches them. Unity Catalog tables are never written offline:
    not checked. Only the JSON commit files are read, once per table per process."""
    root = schema_location(tables) if native else None
    if root is None:
        return native, reason
    found = legacy_tables(root)
    if not found:
        return native, reason
    why = (f"{len(found)} table(s) under {root} have commits written by an earlier dollyflow's offline backend, "
           f"with the job name as a top-level 'job' in commitInfo, which Delta Spark cannot parse: {describe(found)}")
    remedy = (f"`{UPGRADE_COMMAND} tables.warehouse={tables.warehouse}` rewrites those commits in place (job moved "
              "into userMetadata, a backup of each _delta_log kept beside it), or use a fresh tables.warehouse")
    if tables.backend == "native":
        raise BackendError(f"tables.backend=native, but {why}. Run {remedy}; or set tables.backend=offline "
                           "(or auto) to keep them on delta-rs")
    reason = f"{reason}, but {why}; so delta-rs (offline backend), which reads and writes them. To use Delta Spark: {remedy}"
    if root not in _warned:            # once per process: a pipeline makes one store per job
        _warned.add(root)
        log.warning("dollyflow: %s", reason)
    return False, reason


_warned: set[str] = set()


def check_mode(mode: str) -> None:
    """A table write appends or overwrites; nothing else."""
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode must be append or overwrite, not {mode!r}")


class DeltaBackend(ABC):
    """The table work of one backend, on resolved :class:`TableRef`\\ s. Arguments arrive checked;
    ``write_id`` is the unique id the commit carries in its metadata."""

    name: str                 # "native" or "offline"

    def __init__(self, spark, tables: TablesConfig):
        self.spark = spark
        self.tables = tables

    @abstractmethod
    def version(self, ref: TableRef) -> int | None:
        """The table's current version; None when there is no table."""

    @abstractmethod
    def history(self, ref: TableRef, limit: int | None) -> list[dict[str, Any]]:
        """Newest first: version, timestamp, operation, job, run_id, write_id, metrics."""

    @abstractmethod
    def count(self, ref: TableRef, version: int | None) -> int:
        """The exact number of rows at ``version`` (None: current)."""

    @abstractmethod
    def read(self, ref: TableRef, version: int | None):
        """The table as a DataFrame at ``version`` (None: current)."""

    @abstractmethod
    def write(self, df, ref: TableRef, mode: str, job: str, run_id: str, write_id: str, skip: bool,
              evolve_schema: bool) -> Commit:
        """Append or overwrite in one commit; ``skip``: commit nothing when ``df`` has no rows."""

    @abstractmethod
    def append_rows(self, rows: list[tuple], schema, ref: TableRef, job: str, run_id: str, write_id: str,
                    evolve_schema: bool) -> Commit:
        """Append a few (already redacted) rows of the Spark ``schema``."""

    @abstractmethod
    def part_sink(self, ref: TableRef, schema: pa.Schema, write_id: str) -> PartSink:
        """Where tasks write the parts of one write of ``ref``."""

    @abstractmethod
    def commit_parts(self, sink: PartSink, parts: list[tuple[str, int, int]], ref: TableRef, mode: str,
                     job: str, run_id: str) -> Commit:
        """Commit the parts written through ``sink`` as one write (discarding them if it fails)."""

    @abstractmethod
    def merge(self, df, ref: TableRef, keys: list[str], job: str, run_id: str, update: bool,
              absent_at: int | None, write_id: str, update_when: str | None) -> Commit:
        """Upsert ``df`` on ``keys`` (insert-only unless ``update``); creates the table."""

    @abstractmethod
    def replace(self, df, ref: TableRef, predicate: str, job: str, run_id: str, write_id: str) -> Commit:
        """Replace the rows meeting ``predicate`` by ``df``'s in one commit (the table exists)."""
