"""Reading a Delta version without the JVM's Delta: which files, and when a file list is not enough.

A version's rows are its data files' rows only for a plain table. Three things a native writer
(Databricks, Delta Spark) commonly uses change that, and a reader that lists files would get them
wrong with every count still agreeing: deletion vectors (DELETE/UPDATE/MERGE mark rows deleted
instead of rewriting files), column mapping (the files' column names are physical ids, not the
table's names) and partition columns (their values are in the log, not in the files). For those,
the rows come from delta-rs's own protocol-aware scan (:meth:`deltalake.DeltaTable.scan`, DataFusion),
which applies all three; a reader feature it cannot handle is refused, naming it.
"""
from __future__ import annotations

import pyarrow as pa


def special_layout(dt) -> list[str]:
    """What makes this version's rows differ from its files' rows (empty: a plain table)."""
    out = []
    meta = dt.metadata()
    mode = (meta.configuration or {}).get("delta.columnMapping.mode", "none")
    if mode and mode != "none":
        out.append(f"column mapping (mode {mode})")
    if meta.partition_columns:
        out.append(f"partition columns {list(meta.partition_columns)}")
    if deleted_rows(dt):
        out.append("deletion vectors")
    return out


def deleted_rows(dt) -> int:
    """Rows of this version's files that deletion vectors mark deleted (0: none)."""
    if "deletionVectors" not in set(dt.protocol().reader_features or []):
        return 0
    actions = pa.table(dt.get_add_actions(flatten=True))
    cols = [c for c in actions.column_names if c.lower().endswith("cardinality")]
    if cols:
        return sum(int(v or 0) for v in actions.column(cols[0]).to_pylist())
    # no cardinality column: count the masks themselves
    reader = pa.RecordBatchReader.from_stream(dt.deletion_vectors())
    return sum(sum(1 for keep in mask if not keep)
               for batch in reader for mask in batch.column("selection_vector").to_pylist())


def scan(dt) -> pa.Table:
    """The version's rows through delta-rs's protocol-aware scan, in the table's Arrow schema."""
    target = pa.schema(dt.schema().to_arrow())
    try:
        table = pa.RecordBatchReader.from_stream(dt.scan()).read_all()
    except Exception as exc:
        features = sorted(dt.protocol().reader_features or [])
        raise RuntimeError(f"{dt.table_uri}: delta-rs cannot read version {dt.version()} (reader features "
                           f"{features}): {type(exc).__name__}: {str(exc)[:300]}. Read it with tables.backend=native "
                           "(Delta's jars)") from exc
    return table.select(target.names).cast(target)
