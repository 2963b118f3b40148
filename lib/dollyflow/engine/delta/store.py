"""The Delta store: :class:`DeltaStore`, the one gateway for every Delta read and write of the jobs.

It resolves logical table names (:mod:`~dollyflow.engine.delta.refs`), checks arguments, makes
each write's id, and hands the table work to the backend it picked at construction
(:func:`~dollyflow.engine.delta.backend.choose_backend`): native or offline.
"""
from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa

from dollyflow.config import TablesConfig, check_identifier, redact
from dollyflow.core.storage import remove_dir
from dollyflow.engine.delta.backend import DeltaBackend, check_legacy_logs, check_mode, choose_backend
from dollyflow.engine.delta.commit import Commit
from dollyflow.engine.delta.native import NativeBackend
from dollyflow.engine.delta.offline import OfflineBackend
from dollyflow.engine.delta.offline_schema import arrow_schema
from dollyflow.engine.delta.parts import PartSink, discard_parts, write_parts
from dollyflow.engine.delta.refs import TableRef, resolve


class DeltaStore:
    """Read, write, merge and inspect the project's Delta tables by their logical names."""

    def __init__(self, spark, tables: TablesConfig):
        self.spark = spark
        self.tables = tables
        native, self.backend_reason = check_legacy_logs(tables, *choose_backend(spark, tables.backend))
        self._backend: DeltaBackend = (NativeBackend if native else OfflineBackend)(spark, tables)

    @property
    def native(self) -> bool:
        return self._backend.name == "native"

    @property
    def backend(self) -> str:
        return self._backend.name

    def ref(self, name: str) -> TableRef:
        return resolve(self.tables, name)

    def location(self, name: str) -> str:
        return self.ref(name).location

    # -- inspection ---------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.version(name) is not None

    def version(self, name: str) -> int | None:
        return self._backend.version(self.ref(name))

    def history(self, name: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first: version, timestamp (UTC datetime), operation, job, run_id, write_id,
        metrics (the commit's operation metrics)."""
        return self._backend.history(self.ref(name), limit)

    def count(self, name: str, version: int | None = None) -> int:
        """The exact number of rows of the table at ``version`` (default: current), measured from
        the table: offline from the row counts of the version's files (Delta file statistics,
        Parquet footers where a file has none), native with a count Delta answers from its log."""
        return self._backend.count(self.ref(name), version)

    # -- reading ------------------------------------------------------------------------------

    def read(self, name: str, version: int | None = None):
        """The table as a DataFrame, at ``version`` when given (time travel)."""
        return self._backend.read(self.ref(name), version)

    def newest_row(self, name: str, order_by: str = "finished_at") -> dict[str, Any] | None:
        """The row with the greatest ``order_by`` as a dict (one row comes back to the driver), or
        None when the table does not exist or is empty: a job's last run in its ``*_runs`` table."""
        if not self.exists(name):
            return None
        row = self.read(name).orderBy(order_by, ascending=False).limit(1).collect()
        return row[0].asDict() if row else None

    # -- writing ------------------------------------------------------------------------------

    def write(self, df, name: str, mode: str = "append", job: str = "", run_id: str = "",
              skip_empty: bool = False, evolve_schema: bool = False) -> Commit:
        """Append or overwrite; returns this write's own :class:`Commit` (its version and rows).
        Tasks write in parallel and one commit makes all their files visible at once (or none,
        if a task fails). ``skip_empty``: an append of no rows to an existing table commits
        nothing (``Commit.committed`` is False). ``evolve_schema``: an append may add columns
        (run tables that gained a field); otherwise new columns are refused."""
        check_mode(mode)
        ref = self.ref(name)
        write_id = uuid.uuid4().hex
        skip = skip_empty and mode == "append" and self.exists(name)
        return self._backend.write(df, ref, mode, job, run_id, write_id, skip, evolve_schema)

    def append_rows(self, rows: list[tuple], ddl: str, name: str, job: str = "", run_id: str = "",
                    evolve_schema: bool = False) -> Commit:
        """Append a few rows (tuples in the column order of ``ddl``), as the run tables take one per
        run: offline written by pyarrow and committed by delta-rs, no Spark job; natively one
        Delta write. The run tables are read by everyone with access to the schema: every string
        in the rows is redacted first (:func:`~dollyflow.config.redact`: URIs' user info and
        secret query values)."""
        rows = [tuple(redact(list(r))) for r in rows]
        schema = self.spark.createDataFrame([], ddl).schema     # parses the DDL, runs nothing
        return self._backend.append_rows(rows, schema, self.ref(name), job, run_id, uuid.uuid4().hex, evolve_schema)

    def part_sink(self, name: str, schema) -> PartSink:
        """A :class:`PartSink` for a write of ``name`` whose Parquet files the Spark tasks write
        themselves (``schema``: the rows' Spark or Arrow schema). Offline they go straight into the
        table's directory and are committed as they are; natively into a staging directory that
        one Delta write then reads."""
        ref = self.ref(name)
        write_id = uuid.uuid4().hex
        arrow = schema if isinstance(schema, pa.Schema) else arrow_schema(schema)
        return self._backend.part_sink(ref, arrow, write_id)

    def stage(self, df, name: str) -> tuple[PartSink, list[tuple[str, int, int]]]:
        """Write ``df``'s rows for a write of ``name`` without committing it: Spark's Parquet
        writer (every task in parallel) into :meth:`part_sink`'s directory (offline a fresh folder
        of the table, which no version names until the commit; natively a staging directory
        beside the table). Returns the sink and its parts (path, bytes, rows from each file's
        footer), so a caller can check the row counts before anything is committed, then
        :meth:`commit_parts` (one commit, either backend) or :meth:`discard_parts`."""
        sink = self.part_sink(name, df.schema)
        try:
            return sink, sorted(write_parts(df, sink.directory, sink.prefix))
        except BaseException:
            self.discard_parts(sink)
            raise

    def commit_parts(self, sink: PartSink, parts: list[tuple[str, int, int]], name: str,
                     mode: str = "append", job: str = "", run_id: str = "") -> Commit:
        """Commit the files the tasks wrote through ``sink`` (exactly ``parts``, as their
        :meth:`PartSink.write` returned them) as one write of ``name``."""
        return self._backend.commit_parts(sink, parts, self.ref(name), mode, job, run_id)

    def discard_parts(self, sink: PartSink) -> None:
        """Remove what tasks wrote through ``sink`` (a failed job: nothing was committed)."""
        discard_parts(sink)

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
        return self._backend.merge(df, ref, keys, job, run_id, update, None if update else absent_at, write_id,
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
        return self._backend.replace(df, ref, predicate, job, run_id, write_id)

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
