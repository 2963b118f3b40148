"""delta-rs transactions of Parquet files already written under a table: commits and their history.

Spark tasks write the files; one delta-rs commit makes exactly those files visible (append or
overwrite, creating the table), or an append conditional on the table being unchanged since a
version (:func:`append_if_unchanged`). :func:`find_commit` finds a write's own commit by its
write id.
"""
from __future__ import annotations

import json
import time

import pyarrow as pa

from dollyflow.core.object_store import storage_options
from dollyflow.engine.delta.commit import user_metadata


def commit_properties(options: dict[str, str], max_commit_retries: int = 50):
    """delta-rs commit properties: the commit's ``userMetadata`` (job, run_id, write_id as JSON), and
    run_id and write_id as top-level custom metadata. Never a top-level ``job``: Delta's own
    commitInfo has a ``job`` field (a struct), and Delta Spark cannot read a log whose commitInfo
    holds a string there (MALFORMED_RECORD_IN_PARSING on every load)."""
    from deltalake import CommitProperties
    opts = {k.lower(): v for k, v in options.items()}   # Spark may lower-case option keys
    meta = {k: opts[k] for k in ("run_id", "write_id") if opts.get(k)}
    if opts.get("usermetadata"):
        meta["userMetadata"] = opts["usermetadata"]
    elif opts.get("job"):
        meta["userMetadata"] = user_metadata(opts["job"], opts.get("run_id", ""), opts.get("write_id", ""))
    return CommitProperties(custom_metadata=meta or None, max_commit_retries=max_commit_retries)


def find_commit(path: str, write_id: str) -> tuple[int, dict]:
    """(version, history entry) of the commit carrying ``write_id`` in its metadata: the version
    a transaction of ours got, whatever other writers committed before or after it."""
    from deltalake import DeltaTable

    dt = DeltaTable(path, storage_options=storage_options(path))
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
        create_table_with_add_actions(path, Schema.from_arrow(schema), adds, mode="error", storage_options=storage_options(path), commit_properties=props)
        return True
    except Exception:
        if DeltaTable.is_deltatable(path, storage_options=storage_options(path)):
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
    if not DeltaTable.is_deltatable(path, storage_options=storage_options(path)) and _create(path, schema, adds, props):
        return
    if not adds and not overwrite:
        return  # nothing written: no new version
    table = DeltaTable(path, storage_options=storage_options(path))
    check_plain_layout(table)
    _add_new_columns(table, schema, allowed=evolve or overwrite)
    table.create_write_transaction(adds, mode="overwrite" if overwrite else "append", schema=schema,
                                   commit_properties=props)


def check_plain_layout(table) -> None:
    """Files written by Spark's Parquet writer carry the table's column names and no partition
    values: committing them as they are is right only for a table without column mapping and
    partition columns (a native writer may have made either); refuse the others, naming why."""
    meta = table.metadata()
    mode = (meta.configuration or {}).get("delta.columnMapping.mode", "none")
    why = ([f"column mapping (mode {mode})"] if mode and mode != "none" else []) + \
          ([f"partition columns {list(meta.partition_columns)}"] if meta.partition_columns else [])
    if why:
        raise ValueError(f"{table.table_uri}: the offline backend (delta-rs) cannot append files to a table with "
                         f"{' and '.join(why)}; write it with tables.backend=native (Delta's jars)")


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
    check_plain_layout(DeltaTable(path, storage_options=storage_options(path), version=int(base)))
    try:
        DeltaTable(path, storage_options=storage_options(path), version=int(base)).create_write_transaction(adds, mode="append", schema=schema,
                                                                     commit_properties=props)
    except CommitFailedError:
        if DeltaTable(path, storage_options=storage_options(path)).version() > int(base):
            raise TableMoved(f"{path}: version {int(base) + 1} was committed by another writer") from None
        raise
    return int(base) + 1
