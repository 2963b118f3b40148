"""Offline Delta data source: a Spark Python data source over delta-rs, registered as ``delta``.

Used where the JVM has no Delta jars (a laptop without Maven access, plain pyspark in CI).
Writes are distributed: every Spark task writes its own Parquet file into the table directory
and returns an add action; the driver commits all of them in one delta-rs transaction, or, if
any task fails, deletes them and commits nothing, so the table stays at its previous version.
The tables it writes are ordinary Delta tables (readable by delta-rs, Delta Spark, Databricks).

    df.write.format("delta").mode("append").option("job", "ingest").save(path)
    spark.read.format("delta").option("versionAsOf", 3).load(path)
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql.datasource import (DataSource, DataSourceArrowWriter, DataSourceReader,
                                    InputPartition, WriterCommitMessage)
from pyspark.sql.types import StructType

from dollyflow.core.object_store import storage_options
from dollyflow.core.storage import filesystem
from dollyflow.engine.delta.offline_commits import commit_files
from dollyflow.engine.delta.offline_read import scan, special_layout
from dollyflow.engine.delta.offline_schema import arrow_schema, spark_schema

SHORT_NAME = "delta"


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class _FilePartition(InputPartition):
    uri: str


@dataclass
class _ScanPartition(InputPartition):
    """The whole version through delta-rs's protocol-aware scan (deletion vectors, column mapping,
    partition values)."""
    table: str
    version: int


class DeltaRsReader(DataSourceReader):
    def __init__(self, uris: list[str], schema: StructType, scan_at: tuple[str, int] | None = None):
        self.uris = uris
        self.schema = schema
        self.scan_at = scan_at

    def partitions(self):
        if self.scan_at is not None:
            return [_ScanPartition(*self.scan_at)]
        return [_FilePartition(u) for u in self.uris]

    def read(self, partition) -> Iterator[pa.RecordBatch]:
        target = arrow_schema(self.schema)
        if isinstance(partition, _ScanPartition):
            from deltalake import DeltaTable
            table = scan(DeltaTable(partition.table, storage_options=storage_options(partition.table), version=partition.version))
            for batch in table.to_batches(max_chunksize=8192):
                yield pa.RecordBatch.from_arrays(
                    [batch.column(name).cast(field.type) if name in batch.schema.names
                     else pa.nulls(batch.num_rows, field.type)
                     for name, field in zip(target.names, target)], schema=target)
            return
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
        return DeltaTable(self._path(), storage_options=storage_options(self._path()), version=int(version) if version is not None else None)

    def schema(self) -> StructType:
        return spark_schema(pa.schema(self._table().schema().to_arrow()))

    def reader(self, schema: StructType) -> DataSourceReader:
        dt = self._table()
        if special_layout(dt):
            return DeltaRsReader([], schema, scan_at=(self._path(), int(dt.version())))
        return DeltaRsReader(dt.file_uris(), schema)

    def writer(self, schema: StructType, overwrite: bool) -> DeltaRsWriter:
        return DeltaRsWriter(self._path(), schema, overwrite, dict(self.options))
