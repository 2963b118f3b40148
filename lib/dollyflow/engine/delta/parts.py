"""Parquet parts of a table write: written by Spark tasks, counted from their footers, committed later.

A part is ``(path relative to the table or the staging directory, bytes, rows)``: what a commit
of either backend takes. :class:`PartSink` is where tasks that already hold Arrow rows write
their own; :func:`write_parts` has Spark's Parquet writer write a DataFrame's parts.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dollyflow.core.storage import filesystem, remove_dir

#: Delta stores timestamps as INT64 microseconds; Spark's Parquet writer defaults to INT96. Passed
#: as an option of each write (Spark reads it per write), never set on the session.
TIMESTAMP_OPTION = ("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")


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


def discard_parts(sink: PartSink) -> None:
    """Remove what tasks wrote through ``sink`` (a failed job: nothing was committed)."""
    remove_dir(sink.directory, under=sink.parent or sink.directory.rsplit("/", 1)[0])


def write_parts(df, directory: str, prefix: str) -> list[tuple[str, int, int]]:
    """Spark's own Parquet writer (JVM, every task in parallel) into ``directory``; returns its
    files (``prefix/name``, bytes, rows from the footer)."""
    df.write.mode("overwrite").option(*TIMESTAMP_OPTION).parquet(directory)
    fs, root = filesystem(directory)
    parts = []
    for info in fs.get_file_info(pafs_selector(root)):
        if info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith(("_", ".")):
            with fs.open_input_file(info.path) as f:
                rows = pq.ParquetFile(f).metadata.num_rows   # footer only
            parts.append((f"{prefix}/{info.base_name}" if prefix else info.base_name, int(info.size), int(rows)))
    return parts


def pafs_selector(path: str):
    return pafs.FileSelector(path, allow_not_found=True)
