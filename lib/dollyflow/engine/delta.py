"""Every Delta read and write in dollyflow goes through this module.

One API (:class:`DeltaStore`), two backends:

- native: the JVM has Delta (Databricks; spark-submit with the Delta packages): ``format("delta")``
  and ``delta.tables.DeltaTable``. Tables are Unity Catalog ``catalog.schema.table`` when
  ``tables.catalog`` is set, else paths under ``tables.warehouse``.
- offline: no Delta jars (a laptop, CI): the delta-rs Spark data source in
  :mod:`dollyflow.engine.delta_rs` for distributed writes, native Parquet scans of the
  version's files for reads, delta-rs for merge and history.

Table names come from config only and must be plain identifiers.
"""
from __future__ import annotations

import json

import pyarrow as pa
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dollyflow.config import TablesConfig, check_identifier, require_warehouse
from dollyflow.core.storage import remove_dir
from dollyflow.engine.session import jvm_has_delta


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


def _meta(job: str, run_id: str) -> str:
    return json.dumps({"job": job, "run_id": run_id}, sort_keys=True)


class DeltaStore:
    """Read, write, merge and inspect the project's Delta tables by their logical names."""

    def __init__(self, spark, tables: TablesConfig):
        self.spark = spark
        self.tables = tables
        self.last_write_rows: int | None = None
        if tables.backend == "auto":
            self.native = jvm_has_delta(spark)
        else:
            self.native = tables.backend == "native"
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

    def history(self, name: str) -> list[dict[str, Any]]:
        """Newest first: version, timestamp (UTC datetime), operation, job, run_id."""
        ref = self.ref(name)
        out = []
        if self.native:
            dt = self._native_table(ref)
            if dt is None:
                return []
            for row in dt.history().select("version", "timestamp", "operation", "userMetadata").collect():
                meta = json.loads(row["userMetadata"]) if row["userMetadata"] else {}
                out.append({"version": int(row["version"]), "timestamp": row["timestamp"],
                            "operation": row["operation"], "job": meta.get("job"),
                            "run_id": meta.get("run_id")})
            return out
        dt = self._rs_table(ref)
        if dt is None:
            return []
        for h in dt.history():
            meta = {}
            if h.get("userMetadata"):
                try:
                    meta = json.loads(h["userMetadata"])
                except ValueError:
                    meta = {}
            out.append({"version": int(h["version"]),
                        "timestamp": datetime.fromtimestamp(h["timestamp"] / 1000, tz=timezone.utc),
                        "operation": h.get("operation"), "job": h.get("job", meta.get("job")),
                        "run_id": h.get("run_id", meta.get("run_id"))})
        return sorted(out, key=lambda h: -h["version"])

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
              skip_empty: bool = False) -> int | None:
        """Append or overwrite; returns the table's version after the write. Tasks write in
        parallel and one commit makes all their files visible at once (or none, if a task fails).
        ``skip_empty``: an append of no rows to an existing table commits no new version.
        ``self.last_write_rows`` holds the number of rows written."""
        if mode not in ("append", "overwrite"):
            raise ValueError(f"mode must be append or overwrite, not {mode!r}")
        ref = self.ref(name)
        meta = _meta(job, run_id)
        skip = skip_empty and mode == "append" and self.exists(name)
        if self.native:
            if skip and df.isEmpty():
                self.last_write_rows = 0
                return self.version(name)
            w = df.write.format("delta").mode(mode).option("userMetadata", meta)
            if mode == "overwrite":
                w = w.option("overwriteSchema", "true")
            if ref.fqn:
                w.saveAsTable(ref.fqn)
            else:
                w.save(ref.path)
            dt = self._native_table(ref)
            metrics = dt.history(1).select("operationMetrics").first()[0] or {}
            self.last_write_rows = int(metrics.get("numOutputRows", 0))
        else:
            self.last_write_rows = self._rs_write(
                df, ref, mode == "overwrite", {"job": job, "run_id": run_id, "userMetadata": meta}, skip)
        return self.version(name)

    def _rs_write(self, df, ref: TableRef, overwrite: bool, options: dict[str, str],
                  skip_empty: bool = False) -> int:
        """Spark's own Parquet writer (JVM, every task in parallel) into a fresh folder of the
        table, then one delta-rs commit of exactly those files. A failed job commits nothing
        and its folder is removed, so the table stays at its previous version."""
        import pyarrow.parquet as pq

        from dollyflow.engine.delta_rs import arrow_schema, commit_files, filesystem
        folder = f"w-{uuid.uuid4().hex}"
        target = f"{ref.path}/{folder}"
        fs, root = filesystem(target)
        conf = self.spark.conf
        previous = conf.get("spark.sql.parquet.outputTimestampType", None)
        conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")  # Delta's encoding
        try:
            df.write.mode("overwrite").parquet(target)
            files = []
            for info in fs.get_file_info(pafs_selector(root)):
                if info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith(("_", ".")):
                    with fs.open_input_file(info.path) as f:
                        rows = pq.ParquetFile(f).metadata.num_rows   # footer only
                    files.append((f"{folder}/{info.base_name}", info.size, rows))
            rows = sum(r for _, _, r in files)
            if skip_empty and rows == 0:
                fs.delete_dir(root)
                return 0
            commit_files(ref.path, arrow_schema(df.schema), files, overwrite, options)
            return rows
        except BaseException:
            try:
                fs.delete_dir(root)
            except OSError:
                pass
            raise
        finally:
            if previous is None:
                conf.unset("spark.sql.parquet.outputTimestampType")
            else:
                conf.set("spark.sql.parquet.outputTimestampType", previous)

    def merge(self, df, name: str, keys: list[str], job: str = "", run_id: str = "",
              update: bool = True) -> int:
        """Upsert ``df`` into the table on ``keys``: matched rows are updated (unless
        ``update=False``, insert-only), unmatched rows inserted. Creates the table if missing."""
        if not keys:
            raise ValueError("merge needs at least one key column")
        for k in keys:
            check_identifier(k, "merge key")
        if not self.exists(name):
            return self.write(df, name, mode="append", job=job, run_id=run_id)
        ref = self.ref(name)
        cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
        if self.native:
            dt = self._native_table(ref)
            self.spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", _meta(job, run_id))
            try:
                m = dt.alias("t").merge(df.alias("s"), cond)
                if update:
                    m = m.whenMatchedUpdateAll()
                m.whenNotMatchedInsertAll().execute()
            finally:
                self.spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
            return self.version(name)
        return self._rs_merge(df, ref, keys, job, run_id, update)

    def _rs_merge(self, df, ref: TableRef, keys: list[str], job: str, run_id: str, update: bool) -> int:
        """delta-rs merge fed by a Parquet staging copy of ``df`` that Spark tasks write in
        parallel; delta-rs streams it (no Python-side collect of the source rows)."""
        import pyarrow.dataset as ds
        from deltalake import DeltaTable

        from dollyflow.engine.delta_rs import arrow_schema, commit_properties, filesystem
        staging = f"{ref.path}/_dollyflow_staging/{uuid.uuid4().hex}"
        try:
            df.write.mode("overwrite").parquet(staging)
            fs, root = filesystem(staging)
            source = ds.dataset(root, format="parquet", filesystem=fs,
                                schema=arrow_schema(df.schema))
            dt = DeltaTable(ref.path)
            cond = " AND ".join(f"t.{k} = s.{k}" for k in keys)
            m = dt.merge(source=source.scanner().to_reader(), predicate=cond, source_alias="s",
                         target_alias="t",
                         commit_properties=commit_properties(
                             {"job": job, "run_id": run_id, "userMetadata": _meta(job, run_id)}))
            if update:
                m = m.when_matched_update_all()
            m.when_not_matched_insert_all().execute()
        finally:
            fs, root = filesystem(staging)
            try:
                fs.delete_dir(root)
                parent = root.rsplit("/", 1)[0]
                if not fs.get_file_info(pafs_selector(parent)):
                    fs.delete_dir(parent)
            except OSError:
                pass
        return int(DeltaTable(ref.path).version())

    def drop(self, name: str) -> None:
        """Remove a table entirely (tests and demos)."""
        ref = self.ref(name)
        if ref.fqn:
            self.spark.sql(f"DROP TABLE IF EXISTS {ref.fqn}")
        else:
            remove_dir(ref.path)

    def view(self, name: str, version: int | None = None) -> str:
        """Register the table as a temp view named after it (for SQL) and return the view name."""
        self.read(name, version).createOrReplaceTempView(name)
        return name

    # -- backend helpers ----------------------------------------------------------------------

    def _native_table(self, ref: TableRef):
        from delta.tables import DeltaTable
        if ref.fqn:
            return DeltaTable.forName(self.spark, ref.fqn)
        if not DeltaTable.isDeltaTable(self.spark, ref.path):
            return None
        return DeltaTable.forPath(self.spark, ref.path)

    @staticmethod
    def _rs_table(ref: TableRef):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError
        try:
            return DeltaTable(ref.path)
        except TableNotFoundError:
            return None


def pafs_selector(path: str):
    import pyarrow.fs as pafs
    return pafs.FileSelector(path, allow_not_found=True)
