"""Every Delta read and write in dollyflow goes through this module.

One API (:class:`DeltaStore`), two backends:

- native: the JVM has Delta (Databricks; spark-submit with the Delta packages): ``format("delta")``
  and ``delta.tables.DeltaTable``. Tables are Unity Catalog ``catalog.schema.table`` when
  ``tables.catalog`` is set, else paths under ``tables.warehouse``.
- offline: no Delta jars (a laptop, CI): Spark's own Parquet writer for distributed writes, one
  delta-rs commit of exactly the files written (:mod:`dollyflow.engine.delta_rs`), native Parquet
  scans of the version's files for reads, delta-rs for merge and history.

``tables.backend: auto`` picks native when Delta's JVM classes are there and says why
(:attr:`DeltaStore.backend_reason`); ``native`` fails at once, with what to do, when they are not.

Every write and merge returns a :class:`Commit`: the version *its own* commit got and that
commit's row counts, found in the table's history by a unique write id stored in the commit's
metadata (never "the latest version", which another writer may have made). Merges are retried on
conflicts with concurrent writers, so an insert-only merge on a key keeps one row per key however
many jobs run at once. Nothing here changes the Spark session's settings for longer than one
call: the Parquet timestamp encoding is a per-write option, and the one setting Delta offers for
a merge's commit metadata is restored to exactly what the user had.

Table names come from config only and must be plain identifiers.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import pyarrow as pa

from dollyflow.config import TablesConfig, check_identifier, redact, require_warehouse
from dollyflow.core.storage import filesystem, join, remove_dir
from dollyflow.engine.session import detect_delta, master_of

log = logging.getLogger(__name__)

#: Delta stores timestamps as INT64 microseconds; Spark's Parquet writer defaults to INT96. Passed
#: as an option of each write (Spark reads it per write), never set on the session.
TIMESTAMP_OPTION = ("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
#: The only way to give a native Delta MERGE commit metadata; set around the merge and restored.
MERGE_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
COMMIT_RETRIES = 20          # merges retried after a conflicting concurrent commit
_SESSION_CONF_LOCK = threading.Lock()


@dataclass(frozen=True)
class TableRef:
    name: str                 # logical name, e.g. "bronze"
    path: str | None = None   # path-based table
    fqn: str | None = None    # catalog.schema.table

    @property
    def location(self) -> str:
        return self.fqn or self.path or ""


def resolve(tables: TablesConfig, name: str) -> TableRef:
    check_identifier(name, "table name")
    if tables.catalog:
        return TableRef(name, fqn=f"{check_identifier(tables.catalog, 'tables.catalog')}."
                                  f"{check_identifier(tables.schema, 'tables.schema')}.{name}")
    wh = require_warehouse(tables.warehouse)
    if "://" not in wh:
        wh = os.path.abspath(wh)
    return TableRef(name, path=f"{wh.rstrip('/')}/{check_identifier(tables.schema, 'tables.schema')}/{name}")


class Commit(int):
    """What one :meth:`DeltaStore.write` or :meth:`DeltaStore.merge` call committed.

    It *is* the version its own commit got (an ``int``, so ``store.write(...) == 3`` works), and
    carries that commit's numbers, read from the commit itself: ``rows`` (rows the commit added:
    written rows of an append or overwrite, inserted + updated rows of a merge), ``inserted``,
    ``updated``, ``operation``, ``metrics`` (the commit's operation metrics), ``read_version``
    (the table version the commit was based on, when known) and ``write_id``. ``committed`` is
    False when nothing was committed (an empty append with ``skip_empty``, a merge of no rows);
    the version is then the table's version at that moment.
    """

    version: int
    operation: str
    rows: int
    inserted: int
    updated: int
    metrics: dict
    write_id: str
    committed: bool
    read_version: int | None

    def __new__(cls, version: int, *, operation: str, rows: int, inserted: int | None = None,
                updated: int = 0, metrics: dict | None = None, write_id: str = "", committed: bool = True,
                read_version: int | None = None):
        self = super().__new__(cls, int(version))
        self.version = int(version)
        self.operation = operation
        self.rows = int(rows)
        self.inserted = int(rows if inserted is None else inserted)
        self.updated = int(updated)
        self.metrics = dict(metrics or {})
        self.write_id = write_id
        self.committed = committed
        self.read_version = None if read_version is None else int(read_version)
        return self

    def __str__(self) -> str:          # formats as the version number, like the int it is
        return str(self.version)

    def __format__(self, spec: str) -> str:
        return format(self.version, spec)

    def __repr__(self) -> str:
        return (f"Commit(version={self.version}, operation={self.operation!r}, rows={self.rows}, "
                f"inserted={self.inserted}, updated={self.updated}, committed={self.committed})")

    def as_dict(self) -> dict:
        return {"version": self.version, "operation": self.operation, "rows": self.rows,
                "inserted": self.inserted, "updated": self.updated, "committed": self.committed,
                "read_version": self.read_version}


def _meta(job: str, run_id: str, write_id: str = "") -> str:
    return json.dumps({"job": job, "run_id": run_id, "write_id": write_id}, sort_keys=True)


def _history_meta(entry: dict) -> dict:
    """job, run_id, write_id of a history entry: delta-rs keeps them as top-level custom metadata,
    Delta Spark inside the ``userMetadata`` JSON."""
    meta: dict = {}
    raw = entry.get("userMetadata")
    if raw:
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict):
                meta.update(parsed)
        except ValueError:
            pass
    for k in ("job", "run_id", "write_id"):
        if entry.get(k):
            meta[k] = entry[k]
    return meta


@contextlib.contextmanager
def session_conf(spark, settings: dict[str, str]) -> Iterator[None]:
    """Set Spark session settings for the duration of one call, then restore exactly what was
    there before, an unset key included. Calls through here are serialised, so two of our
    own operations never see each other's values."""
    with _SESSION_CONF_LOCK:
        conf = spark.conf
        previous = {k: conf.get(k, None) for k in settings}
        try:
            for k, v in settings.items():
                conf.set(k, v)
            yield
        finally:
            for k, v in previous.items():
                if v is None:
                    conf.unset(k)
                else:
                    conf.set(k, v)


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
            raise RuntimeError(
                f"tables.backend=native, but {why}. Start Spark with Delta Lake (spark-submit --packages "
                "io.delta:delta-spark_2.13:<version> --conf spark.sql.extensions=io.delta.sql."
                "DeltaSparkSessionExtension --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql."
                "delta.catalog.DeltaCatalog), or set tables.backend=offline (delta-rs) or auto")
        return True, f"tables.backend=native; {why}"
    if found is True:
        return True, f"tables.backend=auto: {why}"
    if found is False:
        return False, f"tables.backend=auto: {why}, so delta-rs (offline backend)"
    master = master_of(spark)
    if not master.startswith("local"):
        raise RuntimeError(f"tables.backend=auto cannot tell whether this session has Delta Lake: {why}. "
                           "Set tables.backend=native (the cluster has Delta) or tables.backend=offline")
    reason = f"tables.backend=auto: {why}; local master {master}, so delta-rs (offline backend)"
    log.warning("dollyflow: %s", reason)
    return False, reason


@dataclass(frozen=True)
class PartSink:
    """Where Spark tasks write the Parquet files of one table write themselves (for jobs whose
    tasks already hold the rows as Arrow, such as tokenize's shard writers). Made by
    :meth:`DeltaStore.part_sink`; each task calls :meth:`write` and returns what it gives back;
    the driver hands all of them to :meth:`DeltaStore.commit_parts`: one commit, or none."""
    directory: str            # where the files go (inside the table for the offline backend)
    prefix: str               # their directory relative to the table root ("" when staged outside)
    schema: pa.Schema
    write_id: str
    parent: str = ""          # the directory ``directory`` lies in (checked before it is removed)

    def write(self, table: pa.Table, key: str | None = None) -> tuple[str, int, int]:
        """Write ``table`` as one zstd Parquet file; returns (path relative to the table or the
        staging directory, bytes, rows). A ``key`` makes the name deterministic, so a retried
        task overwrites its own earlier attempt instead of leaving a stray file."""
        import pyarrow.parquet as pq

        name = f"part-{key or uuid.uuid4().hex}-{self.write_id[:12]}.zstd.parquet"
        fs, root = filesystem(self.directory)
        fs.create_dir(root, recursive=True)
        table = table.select(self.schema.names).cast(self.schema)
        path = f"{root}/{name}"
        # no dictionary for list columns (token ids: slower and, after zstd, larger; see
        # core.shards.write_shard)
        dictionary = [f.name for f in self.schema if not pa.types.is_list(f.type)]
        pq.write_table(table, path, filesystem=fs, compression="zstd", use_dictionary=dictionary)
        size = fs.get_file_info(path).size
        return (f"{self.prefix}/{name}" if self.prefix else name, int(size), int(table.num_rows))


class DeltaStore:
    """Read, write, merge and inspect the project's Delta tables by their logical names."""

    def __init__(self, spark, tables: TablesConfig):
        self.spark = spark
        self.tables = tables
        self.native, self.backend_reason = choose_backend(spark, tables.backend)
        if not self.native:
            from dollyflow.engine.session import _register_offline_delta
            _register_offline_delta(spark)

    @property
    def backend(self) -> str:
        return "native" if self.native else "offline"

    def ref(self, name: str) -> TableRef:
        return resolve(self.tables, name)

    def location(self, name: str) -> str:
        return self.ref(name).location

    # -- inspection ---------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.version(name) is not None

    def version(self, name: str) -> int | None:
        ref = self.ref(name)
        if self.native:
            if ref.fqn and not self.spark.catalog.tableExists(ref.fqn):
                return None
            dt = self._native_table(ref)
            if dt is None:
                return None
            return int(dt.history(1).select("version").first()[0])
        dt = self._rs_table(ref)
        return None if dt is None else int(dt.version())

    def history(self, name: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first: version, timestamp (UTC datetime), operation, job, run_id, write_id,
        metrics (the commit's operation metrics)."""
        ref = self.ref(name)
        out = []
        if self.native:
            dt = self._native_table(ref)
            if dt is None:
                return []
            hist = dt.history(limit) if limit else dt.history()
            for row in hist.select("version", "timestamp", "operation", "operationMetrics",
                                   "userMetadata").collect():
                meta = _history_meta({"userMetadata": row["userMetadata"]})
                out.append({"version": int(row["version"]), "timestamp": row["timestamp"],
                            "operation": row["operation"], "job": meta.get("job"),
                            "run_id": meta.get("run_id"), "write_id": meta.get("write_id"),
                            "metrics": dict(row["operationMetrics"] or {})})
            return out
        dt = self._rs_table(ref)
        if dt is None:
            return []
        for h in dt.history(limit):
            meta = _history_meta(h)
            out.append({"version": int(h["version"]),
                        "timestamp": datetime.fromtimestamp(h["timestamp"] / 1000, tz=timezone.utc),
                        "operation": h.get("operation"), "job": meta.get("job"),
                        "run_id": meta.get("run_id"), "write_id": meta.get("write_id"),
                        "metrics": dict(h.get("operationMetrics") or {})})
        return sorted(out, key=lambda h: -h["version"])

    def count(self, name: str, version: int | None = None) -> int:
        """The exact number of rows of the table at ``version`` (default: current), measured from
        the table: offline from the row counts of the version's files (Delta file statistics,
        Parquet footers where a file has none), native with a count Delta answers from its log."""
        ref = self.ref(name)
        if self.native:
            return int(self.read(name, version).count())
        from deltalake import DeltaTable

        import pyarrow.parquet as pq

        dt = DeltaTable(ref.path, version=int(version) if version is not None else None)
        actions = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
        total = 0
        for path, n in zip(actions.get("path", []), actions.get("num_records", [])):
            if n is None:
                fs, root = filesystem(join(ref.path, path))
                with fs.open_input_file(root) as f:
                    n = pq.ParquetFile(f).metadata.num_rows
            total += int(n)
        return total

    # -- reading ------------------------------------------------------------------------------

    def read(self, name: str, version: int | None = None):
        """The table as a DataFrame, at ``version`` when given (time travel)."""
        ref = self.ref(name)
        if self.native:
            reader = self.spark.read
            if version is not None:
                reader = reader.option("versionAsOf", int(version))
            return reader.table(ref.fqn) if ref.fqn else reader.format("delta").load(ref.path)
        from deltalake import DeltaTable

        from dollyflow.engine.delta_rs import spark_schema
        dt = DeltaTable(ref.path, version=int(version) if version is not None else None)
        schema = spark_schema(pa.schema(dt.schema().to_arrow()))
        files = dt.file_uris()
        if not files:
            return self.spark.createDataFrame([], schema)
        # Native Parquet scans of exactly this version's files: fast, distributed, no driver copy.
        return self.spark.read.schema(schema).parquet(*files)

    # -- writing ------------------------------------------------------------------------------

    def write(self, df, name: str, mode: str = "append", job: str = "", run_id: str = "",
              skip_empty: bool = False, evolve_schema: bool = False) -> Commit:
        """Append or overwrite; returns this write's own :class:`Commit` (its version and rows).
        Tasks write in parallel and one commit makes all their files visible at once (or none,
        if a task fails). ``skip_empty``: an append of no rows to an existing table commits
        nothing (``Commit.committed`` is False). ``evolve_schema``: an append may add columns
        (run tables that gained a field); otherwise new columns are refused."""
        if mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be append or overwrite, not {mode!r}")
        ref = self.ref(name)
        write_id = uuid.uuid4().hex
        skip = skip_empty and mode == "append" and self.exists(name)
        if self.native:
            if skip and df.isEmpty():
                return Commit(self.version(name), operation="WRITE", rows=0, committed=False, write_id=write_id)
            w = df.write.format("delta").mode(mode).option("userMetadata", _meta(job, run_id, write_id))
            if mode == "overwrite":
                w = w.option("overwriteSchema", "true")
            elif evolve_schema:
                w = w.option("mergeSchema", "true")
            if ref.fqn:
                w.saveAsTable(ref.fqn)
            else:
                w.save(ref.path)
            return self._native_commit(ref, write_id)
        folder, files = self._rs_stage(df, ref, write_id)
        rows = sum(r for _, _, r in files)
        if skip and rows == 0:
            remove_dir(join(ref.path, folder), under=ref.path)
            return Commit(self.version(name), operation="WRITE", rows=0, committed=False, write_id=write_id)
        try:
            return self._rs_commit(ref, _arrow_schema(df.schema), files, mode == "overwrite", job, run_id,
                                   write_id, evolve_schema)
        except BaseException:
            remove_dir(join(ref.path, folder), under=ref.path)
            raise

    def append_rows(self, rows: list[tuple], ddl: str, name: str, job: str = "", run_id: str = "",
                    evolve_schema: bool = False) -> Commit:
        """Append a few rows (tuples in the column order of ``ddl``), as the run tables take one per
        run: offline written by pyarrow and committed by delta-rs, no Spark job; natively one
        Delta write. The run tables are read by everyone with access to the schema: every string
        in the rows is redacted first (:func:`~dollyflow.config.redact`: URIs' user info and
        secret query values)."""
        rows = [tuple(redact(list(r))) for r in rows]
        schema = self.spark.createDataFrame([], ddl).schema     # parses the DDL, runs nothing
        if self.native:
            return self.write(self.spark.createDataFrame(rows, schema), name, mode="append", job=job,
                              run_id=run_id, evolve_schema=evolve_schema)
        sink = self.part_sink(name, schema)
        table = pa.Table.from_pylist([dict(zip(sink.schema.names, r)) for r in rows], schema=sink.schema)
        try:
            part = sink.write(table)
            return self._rs_commit(self.ref(name), sink.schema, [part], False, job, run_id, sink.write_id,
                                   evolve_schema)
        except BaseException:
            self.discard_parts(sink)
            raise

    def part_sink(self, name: str, schema) -> PartSink:
        """A :class:`PartSink` for a write of ``name`` whose Parquet files the Spark tasks write
        themselves (``schema``: the rows' Spark or Arrow schema). Offline they go straight into the
        table's directory and are committed as they are; natively into a staging directory that
        one Delta write then reads."""
        ref = self.ref(name)
        write_id = uuid.uuid4().hex
        arrow = schema if isinstance(schema, pa.Schema) else _arrow_schema(schema)
        if not self.native:
            folder = f"w-{write_id}"
            return PartSink(join(ref.path, folder), folder, arrow, write_id, parent=ref.path)
        base = ref.path.rsplit("/", 1)[0] if ref.path else self.tables.files_root()
        return PartSink(join(base, "_staging", f"{name}-{write_id}"), "", arrow, write_id,
                        parent=join(base, "_staging"))

    def stage(self, df, name: str) -> tuple[PartSink, list[tuple[str, int, int]]]:
        """Write ``df``'s rows for a write of ``name`` without committing it: Spark's Parquet
        writer (every task in parallel) into :meth:`part_sink`'s directory (offline a fresh folder
        of the table, which no version names until the commit; natively a staging directory
        beside the table). Returns the sink and its parts (path, bytes, rows from each file's
        footer), so a caller can check the row counts before anything is committed, then
        :meth:`commit_parts` (one commit, either backend) or :meth:`discard_parts`."""
        import pyarrow.parquet as pq

        sink = self.part_sink(name, df.schema)
        try:
            df.write.mode("overwrite").option(*TIMESTAMP_OPTION).parquet(sink.directory)
            fs, root = filesystem(sink.directory)
            parts = []
            for info in fs.get_file_info(pafs_selector(root)):
                if info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith(("_", ".")):
                    with fs.open_input_file(info.path) as f:
                        rows = pq.ParquetFile(f).metadata.num_rows   # footer only
                    parts.append((f"{sink.prefix}/{info.base_name}" if sink.prefix else info.base_name,
                                  int(info.size), int(rows)))
            return sink, sorted(parts)
        except BaseException:
            self.discard_parts(sink)
            raise

    def commit_parts(self, sink: PartSink, parts: list[tuple[str, int, int]], name: str,
                     mode: str = "append", job: str = "", run_id: str = "") -> Commit:
        """Commit the files the tasks wrote through ``sink`` (exactly ``parts``, as their
        :meth:`PartSink.write` returned them) as one write of ``name``."""
        ref = self.ref(name)
        try:
            if not self.native:
                return self._rs_commit(ref, sink.schema, parts, mode == "overwrite", job, run_id, sink.write_id)
            from pyspark.sql.pandas.types import from_arrow_schema
            files = [join(sink.directory, p) for p, _, _ in parts]
            df = (self.spark.read.schema(from_arrow_schema(sink.schema)).parquet(*files) if files
                  else self.spark.createDataFrame([], from_arrow_schema(sink.schema)))
            return self.write(df, name, mode=mode, job=job, run_id=run_id)
        except BaseException:
            self.discard_parts(sink)
            raise
        finally:
            if self.native:
                self.discard_parts(sink)

    def discard_parts(self, sink: PartSink) -> None:
        """Remove what tasks wrote through ``sink`` (a failed job: nothing was committed)."""
        remove_dir(sink.directory, under=sink.parent or sink.directory.rsplit("/", 1)[0])

    def merge(self, df, name: str, keys: list[str], job: str = "", run_id: str = "",
              update: bool = True, absent_at: int | None = None, update_when: str | None = None) -> Commit:
        """Upsert ``df`` into the table on ``keys``: matched rows are updated (unless
        ``update=False``: insert-only), unmatched rows inserted; creates the table if missing.
        Conflicts with concurrent commits are retried against the new table state, so with
        ``update=False`` every key is inserted once however many merges run at once. ``df``
        must hold each key once.

        ``update_when``: a SQL condition on the stored row ``t`` and the incoming row ``s``
        (e.g. ``t.finish_reason = 'error'``): only matched rows meeting it are updated, the
        others are left as they are (both backends evaluate it inside the merge, against the
        table state the merge commits on, so a concurrent writer's rows are judged as stored).

        ``absent_at``: for an insert-only merge whose caller already removed the keys present at
        that version (an anti-join against it): offline, if the table is still at that version
        when the rows are committed, they are appended as written, without a join (the usual
        case); otherwise, or natively, a real merge runs."""
        if not keys:
            raise ValueError("merge needs at least one key column")
        for k in keys:
            check_identifier(k, "merge key")
        ref = self.ref(name)
        write_id = uuid.uuid4().hex
        if update_when is not None and not update:
            raise ValueError("merge: update_when is a condition on updates, but update=False")
        if self.native:
            return self._native_merge(df, ref, keys, job, run_id, update, write_id, update_when)
        return self._rs_merge(df, ref, keys, job, run_id, update, None if update else absent_at, write_id,
                              update_when)

    def replace_where(self, df, name: str, match: dict[str, str], job: str = "", run_id: str = "") -> Commit:
        """Replace the rows of ``name`` whose columns equal ``match`` (``{column: value}``) by the
        rows of ``df`` (which must all match it too), in one commit; every other row stays.
        Creates the table when it is missing. Natively Delta's ``replaceWhere``; offline a delta-rs
        overwrite with the same predicate (files holding matching and other rows are rewritten
        without the matching ones). Columns the rows have and the table lacks are added; columns
        the table has and the rows lack are null in the new rows. Values are plain tokens (digests,
        names): ``[A-Za-z0-9._:/-]``."""
        if not match:
            raise ValueError("replace_where needs at least one column = value (else it would replace the table)")
        for col, value in match.items():
            check_identifier(col, "replace_where column")
            if not isinstance(value, str) or not value or not all(c.isalnum() or c in "._:/-" for c in value):
                raise ValueError(f"replace_where: the value for {col} must be a plain token, not {value!r}")
        predicate = " AND ".join(f"{c} = '{v}'" for c, v in match.items())
        ref = self.ref(name)
        if not self.exists(name):
            return self.write(df, name, mode="append", job=job, run_id=run_id)
        write_id = uuid.uuid4().hex
        if self.native:
            return self._native_replace(df, ref, predicate, job, run_id, write_id)
        return self._rs_replace(df, ref, predicate, job, run_id, write_id)

    def drop(self, name: str) -> None:
        """Remove a table entirely (tests and demos)."""
        ref = self.ref(name)
        if ref.fqn:
            self.spark.sql(f"DROP TABLE IF EXISTS {ref.fqn}")
        else:
            remove_dir(ref.path, under=ref.path.rsplit("/", 1)[0])

    def view(self, name: str, version: int | None = None) -> str:
        """Register the table as a temp view named after it (for SQL) and return the view name."""
        self.read(name, version).createOrReplaceTempView(name)
        return name

    # -- native backend -----------------------------------------------------------------------

    def _native_table(self, ref: TableRef):
        from delta.tables import DeltaTable
        if ref.fqn:
            return DeltaTable.forName(self.spark, ref.fqn)
        if not DeltaTable.isDeltaTable(self.spark, ref.path):
            return None
        return DeltaTable.forPath(self.spark, ref.path)

    def _native_commit(self, ref: TableRef, write_id: str) -> Commit:
        """This write's own commit, found by its write id in the table's history."""
        dt = self._native_table(ref)
        for limit in (20, 500, None):
            hist = dt.history(limit) if limit else dt.history()
            rows = hist.select("version", "operation", "operationMetrics", "userMetadata", "readVersion").collect()
            for row in rows:
                if _history_meta({"userMetadata": row["userMetadata"]}).get("write_id") == write_id:
                    return _commit_of(int(row["version"]), row["operation"],
                                      dict(row["operationMetrics"] or {}), write_id, row["readVersion"])
            if limit is None or len(rows) < limit:
                break
        raise RuntimeError(f"{ref.location}: the commit of write {write_id} is not in the table's history")

    def _native_merge(self, df, ref: TableRef, keys: list[str], job: str, run_id: str, update: bool,
                      write_id: str, update_when: str | None = None) -> Commit:
        from delta.exceptions import DeltaConcurrentModificationException

        cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
        meta = _meta(job, run_id, write_id)
        for attempt in range(COMMIT_RETRIES + 1):
            dt = None
            try:
                if not ref.fqn or self.spark.catalog.tableExists(ref.fqn):
                    dt = self._native_table(ref)
                if dt is not None and attempt == 0 and df.isEmpty():
                    return Commit(self.version(ref.name), operation="MERGE", rows=0, committed=False,
                                  write_id=write_id)
                if dt is None:   # no table yet: create it with these rows (a racing creator -> retry as a merge)
                    w = df.write.format("delta").mode("errorifexists").option("userMetadata", meta)
                    if ref.fqn:
                        w.saveAsTable(ref.fqn)
                    else:
                        w.save(ref.path)
                else:
                    with session_conf(self.spark, {MERGE_METADATA_CONF: meta}):
                        m = dt.alias("t").merge(df.alias("s"), cond)
                        if update:
                            m = m.whenMatchedUpdateAll(condition=update_when)
                        m.whenNotMatchedInsertAll().execute()
                return self._native_commit(ref, write_id)
            except DeltaConcurrentModificationException:
                if attempt == COMMIT_RETRIES:
                    raise
            except Exception as exc:  # the create lost a race with another creator
                if dt is not None or "already exists" not in str(exc).lower() or attempt == COMMIT_RETRIES:
                    raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt))
        raise AssertionError("unreachable")

    def _native_replace(self, df, ref: TableRef, predicate: str, job: str, run_id: str, write_id: str) -> Commit:
        from delta.exceptions import DeltaConcurrentModificationException

        meta = _meta(job, run_id, write_id)
        for attempt in range(COMMIT_RETRIES + 1):
            w = (df.write.format("delta").mode("overwrite").option("replaceWhere", predicate)
                 .option("mergeSchema", "true").option("userMetadata", meta))
            try:
                if ref.fqn:
                    w.saveAsTable(ref.fqn)
                else:
                    w.save(ref.path)
                return self._native_commit(ref, write_id)
            except DeltaConcurrentModificationException:
                if attempt == COMMIT_RETRIES:
                    raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt))
        raise AssertionError("unreachable")

    # -- offline backend (delta-rs) -----------------------------------------------------------

    @staticmethod
    def _rs_table(ref: TableRef):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError
        try:
            return DeltaTable(ref.path)
        except TableNotFoundError:
            return None

    def _rs_stage(self, df, ref: TableRef, write_id: str) -> tuple[str, list[tuple[str, int, int]]]:
        """Spark's own Parquet writer (JVM, every task in parallel) into a fresh folder of the
        table; returns the folder and its files (path relative to the table, bytes, rows from the
        footer). The folder is removed if the write fails."""
        import pyarrow.parquet as pq

        folder = f"w-{write_id}"
        target = join(ref.path, folder)
        fs, root = filesystem(target)
        try:
            df.write.mode("overwrite").option(*TIMESTAMP_OPTION).parquet(target)
            files = []
            for info in fs.get_file_info(pafs_selector(root)):
                if info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith(("_", ".")):
                    with fs.open_input_file(info.path) as f:
                        rows = pq.ParquetFile(f).metadata.num_rows   # footer only
                    files.append((f"{folder}/{info.base_name}", info.size, rows))
            return folder, files
        except BaseException:
            remove_dir(target, under=ref.path)
            raise

    def _rs_commit(self, ref: TableRef, schema: pa.Schema, files: list[tuple[str, int, int]], overwrite: bool,
                   job: str, run_id: str, write_id: str, evolve: bool = False) -> Commit:
        """One delta-rs commit of files already under the table (append or overwrite)."""
        from dollyflow.engine.delta_rs import commit_files, find_commit
        commit_files(ref.path, schema, files, overwrite, _options(job, run_id, write_id), evolve)
        version, entry = find_commit(ref.path, write_id)
        return Commit(version, operation=entry.get("operation") or "WRITE", rows=sum(r for _, _, r in files),
                      write_id=write_id, metrics=entry.get("operationMetrics"), read_version=entry.get("readVersion"))

    def _rs_merge(self, df, ref: TableRef, keys: list[str], job: str, run_id: str, update: bool,
                  absent_at: int | None, write_id: str, update_when: str | None = None) -> Commit:
        """Stage ``df`` as Parquet files in the table folder (Spark tasks in parallel). For an
        insert-only merge whose rows are known absent at ``absent_at`` (or a table that does not
        exist yet), first try to commit those files as they are, on condition that no commit
        came in between; otherwise merge with delta-rs, streaming the staged files as the
        source, retried while concurrent commits conflict."""
        import pyarrow.dataset as ds
        from deltalake import DeltaTable
        from deltalake.exceptions import CommitFailedError

        from dollyflow.engine.delta_rs import TableMoved, append_if_unchanged, commit_properties, find_commit
        folder, files = self._rs_stage(df, ref, write_id)
        schema = _arrow_schema(df.schema)
        options = _options(job, run_id, write_id)
        adopted = False
        try:
            rows = sum(r for _, _, r in files)
            current = self._rs_table(ref)
            exists = current is not None
            if exists and rows == 0:
                return Commit(current.version(), operation="MERGE", rows=0, committed=False, write_id=write_id)
            if not exists or (not update and absent_at is not None):
                base = absent_at if exists else None
                try:
                    version = append_if_unchanged(ref.path, schema, files, base, options)
                    adopted = True
                    _, entry = find_commit(ref.path, write_id)
                    return Commit(version, operation=entry.get("operation") or "WRITE", rows=rows,
                                  inserted=rows, write_id=write_id, metrics={"num_target_rows_inserted": rows},
                                  read_version=base)
                except TableMoved:
                    pass   # someone committed meanwhile: a real merge decides what is new
            fs, root = filesystem(join(ref.path, folder))
            paths = [f"{root}/{p.rsplit('/', 1)[-1]}" for p, _, _ in files]
            cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
            for attempt in range(COMMIT_RETRIES + 1):
                source = ds.dataset(paths, format="parquet", filesystem=fs, schema=schema)
                dt = DeltaTable(ref.path)
                m = dt.merge(source=source.scanner().to_reader(), predicate=cond, source_alias="s",
                             target_alias="t", commit_properties=commit_properties(options))
                if update:
                    m = m.when_matched_update_all(predicate=update_when)
                try:
                    metrics = m.when_not_matched_insert_all().execute()
                    break
                except CommitFailedError:
                    if attempt == COMMIT_RETRIES:
                        raise
                    time.sleep(min(2.0, 0.05 * 2 ** attempt))
            version, entry = find_commit(ref.path, write_id)
            inserted = int(metrics.get("num_target_rows_inserted", 0))
            updated = int(metrics.get("num_target_rows_updated", 0))
            return Commit(version, operation=entry.get("operation") or "MERGE", rows=inserted + updated,
                          inserted=inserted, updated=updated, metrics=metrics, write_id=write_id,
                          read_version=entry.get("readVersion"))
        finally:
            if not adopted:
                remove_dir(join(ref.path, folder), under=ref.path)


    def _rs_replace(self, df, ref: TableRef, predicate: str, job: str, run_id: str, write_id: str) -> Commit:
        """Stage ``df`` as Parquet files (Spark tasks in parallel), then one delta-rs overwrite
        with ``predicate`` streaming them in: the matching rows go, the staged rows come, in one
        commit (delta-rs retries it against concurrent commits that do not conflict)."""
        import pyarrow.dataset as ds
        from deltalake import write_deltalake

        from dollyflow.engine.delta_rs import commit_properties, find_commit
        folder, files = self._rs_stage(df, ref, write_id)
        try:
            schema = _arrow_schema(df.schema)
            fs, root = filesystem(join(ref.path, folder))
            paths = [f"{root}/{p.rsplit('/', 1)[-1]}" for p, _, _ in files]
            source = ds.dataset(paths, format="parquet", filesystem=fs, schema=schema)
            write_deltalake(ref.path, source.scanner().to_reader(), mode="overwrite", predicate=predicate,
                            schema_mode="merge",
                            commit_properties=commit_properties(_options(job, run_id, write_id)))
            version, entry = find_commit(ref.path, write_id)
            rows = sum(r for _, _, r in files)
            return Commit(version, operation=entry.get("operation") or "WRITE", rows=rows, write_id=write_id,
                          metrics=entry.get("operationMetrics"), read_version=entry.get("readVersion"))
        finally:
            remove_dir(join(ref.path, folder), under=ref.path)


def _arrow_schema(schema) -> pa.Schema:
    from dollyflow.engine.delta_rs import arrow_schema
    return arrow_schema(schema)


def _options(job: str, run_id: str, write_id: str) -> dict[str, str]:
    return {"job": job, "run_id": run_id, "write_id": write_id, "userMetadata": _meta(job, run_id, write_id)}


def _commit_of(version: int, operation: str, metrics: dict, write_id: str, read_version=None) -> Commit:
    """A native commit's numbers from its operationMetrics (strings in Delta's history)."""
    def num(key: str) -> int:
        try:
            return int(metrics.get(key, 0) or 0)
        except (TypeError, ValueError):
            return 0
    if "MERGE" in (operation or "").upper():
        inserted, updated = num("numTargetRowsInserted"), num("numTargetRowsUpdated")
        return Commit(version, operation=operation, rows=inserted + updated, inserted=inserted, updated=updated,
                      metrics=metrics, write_id=write_id, read_version=read_version)
    return Commit(version, operation=operation, rows=num("numOutputRows"), metrics=metrics, write_id=write_id,
                  read_version=read_version)


def pafs_selector(path: str):
    import pyarrow.fs as pafs
    return pafs.FileSelector(path, allow_not_found=True)
