"""One shard file: its Parquet schema and name, its stats (records, tokens, categories, length
histogram) and writing it with its sha256.

A shard holds record_id, category, input_ids list<int32>, response_start int32 and length int32,
records ordered by split key; it is named ``<split>-<index>-of-<count>.parquet``.
"""
from __future__ import annotations

import hashlib
import io
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dollyflow.core.storage import filesystem, write_bytes

SHARD_SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("category", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("response_start", pa.int32()),
    ("length", pa.int32()),
])


def shard_file_name(split: str, index: int, count: int) -> str:
    """``<split>-<index>-of-<count>.parquet``, zero-padded to five digits."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def histogram_edges(max_length: int) -> list[int]:
    """Half-open bins ``[e[i], e[i+1])``: 0, 64, 128, ... powers of two, then max_length + 1."""
    edges = [0]
    e = 64
    while e <= max_length:
        edges.append(e)
        e *= 2
    if edges[-1] != max_length + 1:
        edges.append(max_length + 1)
    return edges


def shard_stats(table: pa.Table, edges: Sequence[int]) -> dict:
    """Records, tokens, label tokens, per-category counts and the length histogram of a shard."""
    lengths = table.column("length").to_numpy().astype(np.int64)
    starts = table.column("response_start").to_numpy().astype(np.int64)
    cats = table.column("category").to_pylist()
    per_cat: dict[str, dict[str, int]] = {}
    for c, n in zip(cats, lengths.tolist()):
        d = per_cat.setdefault(c if c is not None else "", {"records": 0, "tokens": 0})
        d["records"] += 1
        d["tokens"] += n
    hist = np.histogram(lengths, bins=np.asarray(edges))[0] if len(lengths) else np.zeros(len(edges) - 1)
    return {"records": int(len(lengths)), "tokens": int(lengths.sum()),
            "label_tokens": int((lengths - starts).sum()),
            "categories": dict(sorted(per_cat.items())),
            "length_histogram": [int(x) for x in hist]}


def write_shard(table: pa.Table, path: str, edges: Sequence[int]) -> dict:
    """Write one shard as Parquet; return its stats plus ``bytes`` and ``sha256`` of the file.
    Only ``category`` is dictionary-encoded: token ids spread over a 50k vocabulary, where a
    dictionary costs time and, after zstd, makes the file ~30% larger; record ids are unique."""
    table = table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=["category"])
    data = buf.getvalue()
    write_bytes(path, data)
    stats = shard_stats(table, edges)
    stats.update({"file": path.split("?", 1)[0].rsplit("/", 1)[-1], "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest()})
    return stats


def read_table(path: str) -> pa.Table:
    """A shard file (a local path or a URI) as an Arrow table."""
    fs, p = filesystem(path)
    return pq.read_table(p, filesystem=fs)
