"""The native Delta backend: the JVM has Delta (Databricks; spark-submit with the Delta packages).

Writes are ``format("delta")``, merges and history ``delta.tables.DeltaTable``. Tables are Unity
Catalog ``catalog.schema.table`` when ``tables.catalog`` is set, else paths under
``tables.warehouse``. Nothing here changes the Spark session's settings for longer than one call:
the one setting Delta offers for a merge's commit metadata is restored to exactly what the user
had (:func:`session_conf`).
"""
from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any, Iterator

import pyarrow as pa

from dollyflow.core.storage import join
from dollyflow.engine.delta.backend import DeltaBackend, check_mode
from dollyflow.engine.delta.commit import COMMIT_RETRIES, Commit, history_meta, user_metadata
from dollyflow.engine.delta.parts import PartSink, discard_parts
from dollyflow.engine.delta.refs import TableRef

#: The only way to give a native Delta MERGE commit metadata; set around the merge and restored.
MERGE_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
_SESSION_CONF_LOCK = threading.Lock()


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


class NativeBackend(DeltaBackend):
    """Delta Lake in the JVM: ``format("delta")`` and ``delta.tables.DeltaTable``."""

    name = "native"

    # -- inspection and reading ---------------------------------------------------------------

    def version(self, ref: TableRef) -> int | None:
        if ref.fqn and not self.spark.catalog.tableExists(ref.fqn):
            return None
        dt = self._table(ref)
        if dt is None:
            return None
        return int(dt.history(1).select("version").first()[0])

    def history(self, ref: TableRef, limit: int | None) -> list[dict[str, Any]]:
        out = []
        dt = self._table(ref)
        if dt is None:
            return []
        hist = dt.history(limit) if limit else dt.history()
        for row in hist.select("version", "timestamp", "operation", "operationMetrics",
                               "userMetadata").collect():
            meta = history_meta({"userMetadata": row["userMetadata"]})
            out.append({"version": int(row["version"]), "timestamp": row["timestamp"],
                        "operation": row["operation"], "job": meta.get("job"),
                        "run_id": meta.get("run_id"), "write_id": meta.get("write_id"),
                        "metrics": dict(row["operationMetrics"] or {})})
        return out

    def count(self, ref: TableRef, version: int | None) -> int:
        """A count Delta answers from its log."""
        return int(self.read(ref, version).count())

    def read(self, ref: TableRef, version: int | None):
        reader = self.spark.read
        if version is not None:
            reader = reader.option("versionAsOf", int(version))
        return reader.table(ref.fqn) if ref.fqn else reader.format("delta").load(ref.path)

    # -- writing ------------------------------------------------------------------------------

    def write(self, df, ref: TableRef, mode: str, job: str, run_id: str, write_id: str, skip: bool,
              evolve_schema: bool) -> Commit:
        if skip and df.isEmpty():
            return Commit(self.version(ref), operation="WRITE", rows=0, committed=False, write_id=write_id)
        if mode == "append" and not evolve_schema and self.version(ref) is not None:
            have = set(self.read(ref, None).columns)
            new = [c for c in df.columns if c not in have]
            if new:   # the same refusal, in the same words, as the offline backend
                raise ValueError(f"{ref.location}: the rows have columns the table does not ({', '.join(new)}); "
                                 "write them with evolve_schema=True")
        w = df.write.format("delta").mode(mode).option("userMetadata", user_metadata(job, run_id, write_id))
        if mode == "overwrite":
            w = w.option("overwriteSchema", "true")
        elif evolve_schema:
            w = w.option("mergeSchema", "true")
        if ref.fqn:
            w.saveAsTable(ref.fqn)
        else:
            w.save(ref.path)
        return self._commit(ref, write_id)

    def append_rows(self, rows: list[tuple], schema, ref: TableRef, job: str, run_id: str, write_id: str,
                    evolve_schema: bool) -> Commit:
        """One Delta write."""
        return self.write(self.spark.createDataFrame(rows, schema), ref, "append", job, run_id, write_id, False,
                          evolve_schema)

    def part_sink(self, ref: TableRef, schema: pa.Schema, write_id: str) -> PartSink:
        """A staging directory beside the table, which one Delta write then reads."""
        base = ref.path.rsplit("/", 1)[0] if ref.path else self.tables.files_root()
        return PartSink(join(base, "_staging", f"{ref.name}-{write_id}"), "", schema, write_id,
                        parent=join(base, "_staging"))

    def commit_parts(self, sink: PartSink, parts: list[tuple[str, int, int]], ref: TableRef, mode: str,
                     job: str, run_id: str) -> Commit:
        """One Delta write reading the staged parts; the staging directory is removed after it."""
        try:
            from pyspark.sql.pandas.types import from_arrow_schema
            files = [join(sink.directory, p) for p, _, _ in parts]
            df = (self.spark.read.schema(from_arrow_schema(sink.schema)).parquet(*files) if files
                  else self.spark.createDataFrame([], from_arrow_schema(sink.schema)))
            check_mode(mode)
            return self.write(df, ref, mode, job, run_id, uuid.uuid4().hex, False, False)
        except BaseException:
            discard_parts(sink)
            raise
        finally:
            discard_parts(sink)

    def merge(self, df, ref: TableRef, keys: list[str], job: str, run_id: str, update: bool,
              absent_at: int | None, write_id: str, update_when: str | None) -> Commit:
        """A Delta MERGE (``absent_at`` is not used: a real merge always runs), retried on
        conflicts with concurrent commits; a missing table is created with the rows."""
        from delta.exceptions import DeltaConcurrentModificationException

        cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
        meta = user_metadata(job, run_id, write_id)
        for attempt in range(COMMIT_RETRIES + 1):
            dt = None
            try:
                if not ref.fqn or self.spark.catalog.tableExists(ref.fqn):
                    dt = self._table(ref)
                if dt is not None and attempt == 0 and df.isEmpty():
                    return Commit(self.version(ref), operation="MERGE", rows=0, committed=False,
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
                return self._commit(ref, write_id)
            except DeltaConcurrentModificationException:
                if attempt == COMMIT_RETRIES:
                    raise
            except Exception as exc:  # the create lost a race with another creator
                if dt is not None or "already exists" not in str(exc).lower() or attempt == COMMIT_RETRIES:
                    raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt))
        raise AssertionError("unreachable")

    def replace(self, df, ref: TableRef, predicate: str, job: str, run_id: str, write_id: str) -> Commit:
        """Delta's ``replaceWhere``, retried on conflicts with concurrent commits."""
        from delta.exceptions import DeltaConcurrentModificationException

        meta = user_metadata(job, run_id, write_id)
        for attempt in range(COMMIT_RETRIES + 1):
            w = (df.write.format("delta").mode("overwrite").option("replaceWhere", predicate)
                 .option("mergeSchema", "true").option("userMetadata", meta))
            try:
                if ref.fqn:
                    w.saveAsTable(ref.fqn)
                else:
                    w.save(ref.path)
                return self._commit(ref, write_id)
            except DeltaConcurrentModificationException:
                if attempt == COMMIT_RETRIES:
                    raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt))
        raise AssertionError("unreachable")

    # -- helpers ------------------------------------------------------------------------------

    def _table(self, ref: TableRef):
        from delta.tables import DeltaTable
        if ref.fqn:
            return DeltaTable.forName(self.spark, ref.fqn)
        if not DeltaTable.isDeltaTable(self.spark, ref.path):
            return None
        return DeltaTable.forPath(self.spark, ref.path)

    def _commit(self, ref: TableRef, write_id: str) -> Commit:
        """This write's own commit, found by its write id in the table's history."""
        dt = self._table(ref)
        for limit in (20, 500, None):
            hist = dt.history(limit) if limit else dt.history()
            rows = hist.select("version", "operation", "operationMetrics", "userMetadata", "readVersion").collect()
            for row in rows:
                if history_meta({"userMetadata": row["userMetadata"]}).get("write_id") == write_id:
                    return _commit_of(int(row["version"]), row["operation"],
                                      dict(row["operationMetrics"] or {}), write_id, row["readVersion"])
            if limit is None or len(rows) < limit:
                break
        raise RuntimeError(f"{ref.location}: the commit of write {write_id} is not in the table's history")


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
