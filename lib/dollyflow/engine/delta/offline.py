"""The offline Delta backend: no Delta jars (a laptop, CI), so Spark's Parquet writer and delta-rs.

Spark's own Parquet writer does the distributed writes, one delta-rs commit takes exactly the
files written (:mod:`dollyflow.engine.delta.offline_commits`), reads are native Parquet scans of
the version's files, merges and history are delta-rs. The ``delta`` data source
(:mod:`dollyflow.engine.delta.offline_source`) is registered on the session.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from dollyflow.core.object_store import storage_options
from dollyflow.core.storage import filesystem, join, remove_dir
from dollyflow.engine.delta.backend import DeltaBackend
from dollyflow.engine.delta.commit import COMMIT_RETRIES, Commit, commit_options, history_meta
from dollyflow.engine.delta.offline_commits import (TableMoved, append_if_unchanged, commit_files,
                                                    commit_properties, find_commit)
from dollyflow.engine.delta.offline_read import deleted_rows, scan, special_layout
from dollyflow.engine.delta.offline_schema import arrow_schema, spark_schema
from dollyflow.engine.delta.parts import PartSink, discard_parts, write_parts
from dollyflow.engine.delta.refs import TableRef
from dollyflow.engine.session import _register_offline_delta


class OfflineBackend(DeltaBackend):
    """Delta tables by path, written by Spark's Parquet writer and committed by delta-rs."""

    name = "offline"

    def __init__(self, spark, tables):
        super().__init__(spark, tables)
        _register_offline_delta(spark)

    # -- inspection and reading ---------------------------------------------------------------

    def version(self, ref: TableRef) -> int | None:
        dt = self._table(ref)
        return None if dt is None else int(dt.version())

    def history(self, ref: TableRef, limit: int | None) -> list[dict[str, Any]]:
        out = []
        dt = self._table(ref)
        if dt is None:
            return []
        for h in dt.history(limit):
            meta = history_meta(h)
            out.append({"version": int(h["version"]),
                        "timestamp": datetime.fromtimestamp(h["timestamp"] / 1000, tz=timezone.utc),
                        "operation": h.get("operation"), "job": meta.get("job"),
                        "run_id": meta.get("run_id"), "write_id": meta.get("write_id"),
                        "metrics": dict(h.get("operationMetrics") or {})})
        return sorted(out, key=lambda h: -h["version"])

    def count(self, ref: TableRef, version: int | None) -> int:
        """From the row counts of the version's files (Delta file statistics, Parquet footers
        where a file has none), less the rows deletion vectors mark deleted."""
        from deltalake import DeltaTable

        dt = DeltaTable(ref.path, storage_options=storage_options(ref.path), version=int(version) if version is not None else None)
        actions = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
        total = 0
        for path, n in zip(actions.get("path", []), actions.get("num_records", [])):
            if n is None:
                fs, root = filesystem(join(ref.path, path))
                with fs.open_input_file(root) as f:
                    n = pq.ParquetFile(f).metadata.num_rows
            total += int(n)
        return total - deleted_rows(dt)

    def read(self, ref: TableRef, version: int | None):
        """A plain table: native Parquet scans of exactly this version's files (fast, distributed,
        no driver copy). A table a native writer gave deletion vectors, column mapping or
        partition columns: delta-rs's protocol-aware scan (:mod:`~dollyflow.engine.delta.offline_read`)."""
        from deltalake import DeltaTable

        dt = DeltaTable(ref.path, storage_options=storage_options(ref.path), version=int(version) if version is not None else None)
        arrow = pa.schema(dt.schema().to_arrow())
        schema = spark_schema(arrow)
        if special_layout(dt):
            table = scan(dt)
            return self.spark.createDataFrame(table if table.num_rows else [], schema=schema)
        files = dt.file_uris()
        if not files:
            return self.spark.createDataFrame([], schema)
        return self.spark.read.schema(schema).parquet(*files)

    # -- writing ------------------------------------------------------------------------------

    def write(self, df, ref: TableRef, mode: str, job: str, run_id: str, write_id: str, skip: bool,
              evolve_schema: bool) -> Commit:
        folder, files = self._stage(df, ref, write_id)
        rows = sum(r for _, _, r in files)
        if skip and rows == 0:
            remove_dir(join(ref.path, folder), under=ref.path)
            return Commit(self.version(ref), operation="WRITE", rows=0, committed=False, write_id=write_id)
        try:
            return self._commit(ref, arrow_schema(df.schema), files, mode == "overwrite", job, run_id,
                                write_id, evolve_schema)
        except BaseException:
            remove_dir(join(ref.path, folder), under=ref.path)
            raise

    def append_rows(self, rows: list[tuple], schema, ref: TableRef, job: str, run_id: str, write_id: str,
                    evolve_schema: bool) -> Commit:
        """Written by pyarrow and committed by delta-rs, no Spark job."""
        sink = self.part_sink(ref, arrow_schema(schema), write_id)
        table = pa.Table.from_pylist([dict(zip(sink.schema.names, r)) for r in rows], schema=sink.schema)
        try:
            part = sink.write(table)
            return self._commit(ref, sink.schema, [part], False, job, run_id, sink.write_id, evolve_schema)
        except BaseException:
            discard_parts(sink)
            raise

    def part_sink(self, ref: TableRef, schema: pa.Schema, write_id: str) -> PartSink:
        """A fresh folder of the table's directory; its files are committed as they are."""
        folder = f"w-{write_id}"
        return PartSink(join(ref.path, folder), folder, schema, write_id, parent=ref.path)

    def commit_parts(self, sink: PartSink, parts: list[tuple[str, int, int]], ref: TableRef, mode: str,
                     job: str, run_id: str) -> Commit:
        try:
            return self._commit(ref, sink.schema, parts, mode == "overwrite", job, run_id, sink.write_id)
        except BaseException:
            discard_parts(sink)
            raise

    def merge(self, df, ref: TableRef, keys: list[str], job: str, run_id: str, update: bool,
              absent_at: int | None, write_id: str, update_when: str | None) -> Commit:
        """Stage ``df`` as Parquet files in the table folder (Spark tasks in parallel). For an
        insert-only merge whose rows are known absent at ``absent_at`` (or a table that does not
        exist yet), first try to commit those files as they are, on condition that no commit
        came in between; otherwise merge with delta-rs, streaming the staged files as the
        source, retried while concurrent commits conflict."""
        from deltalake import DeltaTable
        from deltalake.exceptions import CommitFailedError

        folder, files = self._stage(df, ref, write_id)
        schema = arrow_schema(df.schema)
        options = commit_options(job, run_id, write_id)
        adopted = False
        try:
            rows = sum(r for _, _, r in files)
            current = self._table(ref)
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
                dt = DeltaTable(ref.path, storage_options=storage_options(ref.path))
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

    def replace(self, df, ref: TableRef, predicate: str, job: str, run_id: str, write_id: str) -> Commit:
        """Stage ``df`` as Parquet files (Spark tasks in parallel), then one delta-rs overwrite
        with ``predicate`` streaming them in: the matching rows go, the staged rows come, in one
        commit (delta-rs retries it against concurrent commits that do not conflict)."""
        from deltalake import write_deltalake

        folder, files = self._stage(df, ref, write_id)
        try:
            schema = arrow_schema(df.schema)
            fs, root = filesystem(join(ref.path, folder))
            paths = [f"{root}/{p.rsplit('/', 1)[-1]}" for p, _, _ in files]
            source = ds.dataset(paths, format="parquet", filesystem=fs, schema=schema)
            write_deltalake(ref.path, source.scanner().to_reader(), storage_options=storage_options(ref.path), mode="overwrite", predicate=predicate,
                            schema_mode="merge",
                            commit_properties=commit_properties(commit_options(job, run_id, write_id)))
            version, entry = find_commit(ref.path, write_id)
            rows = sum(r for _, _, r in files)
            return Commit(version, operation=entry.get("operation") or "WRITE", rows=rows, write_id=write_id,
                          metrics=entry.get("operationMetrics"), read_version=entry.get("readVersion"))
        finally:
            remove_dir(join(ref.path, folder), under=ref.path)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _table(ref: TableRef):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError
        try:
            return DeltaTable(ref.path, storage_options=storage_options(ref.path))
        except TableNotFoundError:
            return None

    def _stage(self, df, ref: TableRef, write_id: str) -> tuple[str, list[tuple[str, int, int]]]:
        """Spark's own Parquet writer (JVM, every task in parallel) into a fresh folder of the
        table; returns the folder and its files (path relative to the table, bytes, rows from the
        footer). The folder is removed if the write fails."""
        folder = f"w-{write_id}"
        target = join(ref.path, folder)
        try:
            return folder, write_parts(df, target, folder)
        except BaseException:
            remove_dir(target, under=ref.path)
            raise

    def _commit(self, ref: TableRef, schema: pa.Schema, files: list[tuple[str, int, int]], overwrite: bool,
                job: str, run_id: str, write_id: str, evolve: bool = False) -> Commit:
        """One delta-rs commit of files already under the table (append or overwrite)."""
        commit_files(ref.path, schema, files, overwrite, commit_options(job, run_id, write_id), evolve)
        version, entry = find_commit(ref.path, write_id)
        return Commit(version, operation=entry.get("operation") or "WRITE", rows=sum(r for _, _, r in files),
                      write_id=write_id, metrics=entry.get("operationMetrics"), read_version=entry.get("readVersion"))
