"""Offline Delta backend: a Spark Python data source over delta-rs, registered as ``delta``.

Used where the JVM has no Delta jars (a laptop without Maven access, plain pyspark in CI).
Writes are distributed: every Spark task writes its own Parquet file into the table directory
and returns an add action; the driver commits all of them in one delta-rs transaction, or, if
any task fails, deletes them and commits nothing, so the table stays at its previous version.
The tables it writes are ordinary Delta tables (readable by delta-rs, Delta Spark, Databricks).

    df.write.format("delta").mode("append").option("job", "ingest").save(path)
    spark.read.format("delta").option("versionAsOf", 3).load(path)
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql.datasource import (DataSource, DataSourceArrowWriter, DataSourceReader,
                                    InputPartition, WriterCommitMessage)
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import StructType

from dollyflow.core.storage import filesystem

SHORT_NAME = "delta"


def arrow_schema(schema: StructType) -> pa.Schema:
    """The Arrow schema delta-rs should store for a Spark schema (UTC microsecond timestamps)."""
    return to_arrow_schema(schema, timezone="UTC")


def spark_schema(schema: pa.Schema) -> StructType:
    """Spark schema of a delta-rs table; delta-rs reports string_view/large types, Spark wants plain."""
    return from_arrow_schema(pa.schema([pa.field(f.name, _plain(f.type), f.nullable) for f in schema]))


def _plain(t: pa.DataType) -> pa.DataType:
    if t in (pa.string_view(), pa.large_string()):
        return pa.string()
    if t in (pa.binary_view(), pa.large_binary()):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t) \
            or pa.types.is_list(t):
        return pa.list_(pa.field(t.value_field.name, _plain(t.value_type), t.value_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _plain(f.type), f.nullable) for f in t])
    if pa.types.is_map(t):
        return pa.map_(_plain(t.key_type), _plain(t.item_type))
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC") if t.tz else pa.timestamp("us")
    return t


def commit_properties(options: dict[str, str], max_commit_retries: int = 50):
    """delta-rs commit properties: job, run_id, write_id and userMetadata as custom metadata."""
    from deltalake import CommitProperties
    opts = {k.lower(): v for k, v in options.items()}   # Spark may lower-case option keys
    meta = {k: opts[k] for k in ("job", "run_id", "write_id") if opts.get(k)}
    if opts.get("usermetadata"):
        meta["userMetadata"] = opts["usermetadata"]
    return CommitProperties(custom_metadata=meta or None, max_commit_retries=max_commit_retries)


def find_commit(path: str, write_id: str) -> tuple[int, dict]:
    """(version, history entry) of the commit carrying ``write_id`` in its metadata: the version
    a transaction of ours got, whatever other writers committed before or after it."""
    from deltalake import DeltaTable

    dt = DeltaTable(path)
    for limit in (20, 500, None):
        entries = dt.history(limit)
        for h in entries:
            if h.get("write_id") == write_id:
                return int(h["version"]), h
            raw = h.get("userMetadata")
            if raw and write_id in raw:
                try:
                    if json.loads(raw).get("write_id") == write_id:
                        return int(h["version"]), h
                except (ValueError, AttributeError):
                    pass
        if limit is None or len(entries) < limit:
            break
    raise RuntimeError(f"{path}: no commit of write {write_id} in the table's history")


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class _FilePartition(InputPartition):
    uri: str


class DeltaRsReader(DataSourceReader):
    def __init__(self, uris: list[str], schema: StructType):
        self.uris = uris
        self.schema = schema

    def partitions(self):
        return [_FilePartition(u) for u in self.uris]

    def read(self, partition: _FilePartition) -> Iterator[pa.RecordBatch]:
        target = arrow_schema(self.schema)
        fs, path = filesystem(partition.uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
                yield pa.RecordBatch.from_arrays(
                    [batch.column(name).cast(field.type) if name in batch.schema.names
                     else pa.nulls(batch.num_rows, field.type)
                     for name, field in zip(target.names, target)], schema=target)


# ---------------------------------------------------------------------------------------------
# writing


@dataclass
class DeltaAddMessage(WriterCommitMessage):
    """What one task wrote: files relative to the table root with their sizes and row counts."""
    files: list[tuple[str, int, int]]


class DeltaRsWriter(DataSourceArrowWriter):
    def __init__(self, path: str, schema: StructType, overwrite: bool, options: dict[str, str]):
        self.path = path
        self.schema = schema
        self.overwrite = overwrite
        self.options = options

    def write(self, iterator: Iterator[pa.RecordBatch]) -> DeltaAddMessage:
        target = arrow_schema(self.schema)
        fs, root = filesystem(self.path)
        fs.create_dir(root, recursive=True)
        name = f"part-{uuid.uuid4().hex}-c000.zstd.parquet"
        writer = None
        rows = 0
        try:
            for batch in iterator:
                if batch.num_rows == 0:
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(f"{root}/{name}", target, filesystem=fs, compression="zstd")
                writer.write_batch(batch.cast(target) if batch.schema != target else batch)
                rows += batch.num_rows
        except BaseException:
            if writer is not None:
                writer.close()
                fs.delete_file(f"{root}/{name}")
            raise
        if writer is None:
            return DeltaAddMessage(files=[])
        writer.close()
        size = fs.get_file_info(f"{root}/{name}").size
        return DeltaAddMessage(files=[(name, size, rows)])

    def commit(self, messages: list[DeltaAddMessage]) -> None:
        files = [f for m in messages if m is not None for f in m.files]
        commit_files(self.path, arrow_schema(self.schema), files, self.overwrite, self.options)

    def abort(self, messages: list[DeltaAddMessage]) -> None:
        fs, root = filesystem(self.path)
        for m in messages:
            for (p, _, _) in (m.files if m is not None else []):
                try:
                    fs.delete_file(f"{root}/{p}")
                except OSError:
                    pass


def _adds(files: list[tuple[str, int, int]]):
    from deltalake.transaction import AddAction
    now = int(time.time() * 1000)
    return [AddAction(path=p, size=size, partition_values={}, modification_time=now,
                      data_change=True, stats=json.dumps({"numRecords": rows}))
            for (p, size, rows) in files]


def _create(path: str, schema: pa.Schema, adds, props) -> bool:
    """Create the table with ``adds`` as version 0; False when a table is there already (or
    another creator got there first)."""
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import create_table_with_add_actions
    try:
        create_table_with_add_actions(path, Schema.from_arrow(schema), adds, mode="error", commit_properties=props)
        return True
    except Exception:
        if DeltaTable.is_deltatable(path):
            return False
        raise


def commit_files(path: str, schema: pa.Schema, files: list[tuple[str, int, int]], overwrite: bool,
                 options: dict[str, str], evolve: bool = False) -> None:
    """Make Parquet files already written under ``path`` (relative paths, sizes, row counts)
    visible in one Delta transaction: append, or overwrite (the old files are removed from the
    new version, not deleted from storage, so time travel still works). Creates the table.
    Columns the table does not have are added first when ``evolve`` (or on an overwrite), and
    refused otherwise (delta-rs would silently commit the files under the old schema)."""
    from deltalake import DeltaTable

    adds = _adds(files)
    props = commit_properties(options)
    if not DeltaTable.is_deltatable(path) and _create(path, schema, adds, props):
        return
    if not adds and not overwrite:
        return  # nothing written: no new version
    table = DeltaTable(path)
    _add_new_columns(table, schema, allowed=evolve or overwrite)
    table.create_write_transaction(adds, mode="overwrite" if overwrite else "append", schema=schema,
                                   commit_properties=props)


def _add_new_columns(table, schema: pa.Schema, allowed: bool) -> None:
    from deltalake import Schema
    have = {f.name for f in table.schema().fields}
    new = [f for f in Schema.from_arrow(schema).fields if f.name not in have]
    if not new:
        return
    if not allowed:
        raise ValueError(f"{table.table_uri}: the rows have columns the table does not "
                         f"({', '.join(f.name for f in new)}); write them with evolve_schema=True")
    table.alter.add_columns(new)


class TableMoved(Exception):
    """The table is no longer at the version a conditional append was based on."""


def append_if_unchanged(path: str, schema: pa.Schema, files: list[tuple[str, int, int]], base: int | None,
                        options: dict[str, str]) -> int:
    """Append the files as the commit right after version ``base`` (None: create the table), or
    raise :class:`TableMoved` when another commit took that place: an append that cannot
    silently interleave with a concurrent writer. Returns the version committed."""
    from deltalake import DeltaTable
    from deltalake.exceptions import CommitFailedError

    adds = _adds(files)
    props = commit_properties(options, max_commit_retries=0)
    if base is None:
        if _create(path, schema, adds, props):
            return 0
        raise TableMoved(f"{path}: created by another writer")
    try:
        DeltaTable(path, version=int(base)).create_write_transaction(adds, mode="append", schema=schema,
                                                                     commit_properties=props)
    except CommitFailedError:
        if DeltaTable(path).version() > int(base):
            raise TableMoved(f"{path}: version {int(base) + 1} was committed by another writer") from None
        raise
    return int(base) + 1


# ---------------------------------------------------------------------------------------------
# the data source


class DeltaRsDataSource(DataSource):
    """``format("delta")`` over delta-rs; options: path, versionAsOf, job, run_id, userMetadata."""

    @classmethod
    def name(cls) -> str:
        return SHORT_NAME

    def _path(self) -> str:
        path = self.options.get("path")
        if not path:
            raise ValueError("the delta data source needs a path: .load(path) / .save(path)")
        return path

    def _table(self):
        from deltalake import DeltaTable
        version = self.options.get("versionAsOf")
        return DeltaTable(self._path(), version=int(version) if version is not None else None)

    def schema(self) -> StructType:
        return spark_schema(pa.schema(self._table().schema().to_arrow()))

    def reader(self, schema: StructType) -> DataSourceReader:
        return DeltaRsReader(self._table().file_uris(), schema)

    def writer(self, schema: StructType, overwrite: bool) -> DeltaRsWriter:
        return DeltaRsWriter(self._path(), schema, overwrite, dict(self.options))
