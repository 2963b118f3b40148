"""Spark glue for the tokenize job: DataFrame -> DataFrame functions around the engine-free core.

- :func:`tokenize_records`: ``mapInArrow``; each Arrow batch (up to
  ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows) is encoded with one batched call of the
  Rust tokenizer. The tokenizer travels as its ``tokenizer.json`` text inside the task closure
  (PySpark broadcasts large commands by itself, and closures work with classic Spark and Spark
  Connect alike) and is built once per Python worker process (:func:`backend_from_json` caches it
  by sha256; Spark reuses workers), never per row or per batch.
- :func:`summarize`: one small pass over the (cached) tokenized rows: rows per drop reason and
  the narrow columns of the kept ones, from which the driver works out the hash split of the
  core (:mod:`dollyflow.core.split`, exact for counts) and each split's token-balanced shard
  plan (:func:`dollyflow.core.shards.plan_shards`), both as ranges of (split_key, record_id).
- :func:`assign_shards`: those ranges as a column expression (a short CASE on split_key), so
  the token rows get their split and shard where they are, without a join with a plan.
- :func:`write_outputs`: one task per shard writes, from the same Arrow rows, the shard file
  (straight to the shard directory: a local path, a FUSE path such as ``/dbfs`` or ``/Volumes``,
  or a pyarrow URI) and the ``tokenized`` table's Parquet file for that shard (through the
  :class:`~dollyflow.engine.delta.PartSink` the Delta store gave it); the tasks return each
  shard's stats for the manifest and each table file for the commit. One pass, no second scan.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dollyflow.core.counts import expect_equal
from dollyflow.core.shards import plan_shards as core_plan_shards
from dollyflow.core.shards import shard_file_name, write_shard
from dollyflow.core.storage import join
from dollyflow.core.split import TEST, TRAIN, select_test, split_keys
from dollyflow.core.tokens import backend_from_json, encode_records, set_single_thread

#: The tokenizer's output inside the job. ``ids`` holds a record's token ids as little-endian
#: int32 bytes: a binary column crosses Arrow <-> JVM, the cache and the shuffle as one copy,
#: where an array<int> is converted element by element each time. The written table and shards
#: hold them as list<int32> (``input_ids``): :func:`ids_to_list` turns one into the other.
TOKENIZED_DDL = ("record_id string, category string, split_key long, ids binary, "
                 "response_start int, length int, drop_reason string")
TOKENIZED_ARROW = pa.schema([
    ("record_id", pa.string()), ("category", pa.string()), ("split_key", pa.int64()),
    ("ids", pa.binary()), ("response_start", pa.int32()), ("length", pa.int32()),
    ("drop_reason", pa.string()),
])
TABLE_ARROW = pa.schema([("record_id", pa.string()), ("split", pa.string()), ("category", pa.string()),
                         ("input_ids", pa.list_(pa.int32())), ("response_start", pa.int32()),
                         ("length", pa.int32())])


def ids_to_binary(input_ids: list) -> pa.Array:
    """Token id lists (None for dropped records) -> a binary array of little-endian int32."""
    sizes = np.fromiter((0 if x is None else len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    offsets = np.zeros(len(input_ids) + 1, dtype=np.int32)
    np.cumsum(sizes * 4, out=offsets[1:])
    data = np.fromiter(chain.from_iterable(x for x in input_ids if x is not None), dtype="<i4",
                       count=int(sizes.sum()))
    valid = pa.array([x is not None for x in input_ids], type=pa.bool_())
    nulls = len(input_ids) - int(valid.sum().as_py() or 0)
    return pa.Array.from_buffers(pa.binary(), len(input_ids),
                                 [valid.buffers()[1] if nulls else None, pa.py_buffer(offsets), pa.py_buffer(data)],
                                 null_count=nulls)


def ids_to_list(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The binary ``ids`` column -> ``list<int32>`` (zero-copy for the values)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32)[ids.offset:ids.offset + n + 1]
    data = ids.buffers()[2]
    values = np.frombuffer(data, dtype="<i4", count=(int(offsets[-1]) - int(offsets[0])) // 4,
                           offset=int(offsets[0])) if data is not None and n else np.zeros(0, dtype="<i4")
    return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]) // 4, type=pa.int32()),
                                    pa.array(values, type=pa.int32()),
                                    mask=ids.is_null() if ids.null_count else None)


def _encode_batch(rb: pa.RecordBatch, backend, max_length: int, seed: int) -> pa.RecordBatch:
    rids = rb.column("record_id").to_pylist()
    enc = encode_records(backend, rb.column("instruction").to_pylist(), rb.column("context").to_pylist(),
                         rb.column("response").to_pylist(), max_length)
    arrays = [
        rb.column("record_id").cast(pa.string()),
        rb.column("category").cast(pa.string()),
        pa.array(split_keys(rids, seed), type=pa.int64()),
        ids_to_binary(enc.input_ids),
        pa.array(enc.response_start, type=pa.int32()),
        pa.array(enc.length, type=pa.int32()),
        pa.array(enc.drop_reason, type=pa.string()),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=TOKENIZED_ARROW)


def with_parallelism(df, factor: int = 1):
    """Repartition (round robin) an input with fewer than ``factor`` x cores partitions, so that
    tokenization uses every core (a small silver table may be a single file). Order does not
    matter downstream: splits are by hash and shards are sorted by split key."""
    try:
        cores = df.sparkSession.sparkContext.defaultParallelism
        n = df.rdd.getNumPartitions()
    except Exception:  # Spark Connect has no RDD API: keep the input's partitioning
        return df
    target = max(1, int(factor) * int(cores))
    return df.repartition(target) if n < target else df


def tokenize_records(df, tokenizer_json: str, max_length: int, seed: int = 42):
    """silver-shaped rows -> one row per record: split_key, ids (token ids as int32 bytes),
    response_start, length and drop_reason (null when kept; ids and response_start are null for
    dropped records)."""
    cols = ["record_id", "instruction", "context", "response", "category"]
    return df.select(*cols).mapInArrow(encoder(tokenizer_json, max_length, seed), TOKENIZED_DDL)


def encoder(tokenizer_json: str, max_length: int, seed: int = 42):
    """The mapInArrow function of :func:`tokenize_records`: Arrow batches of silver columns ->
    Arrow batches of :data:`TOKENIZED_ARROW`."""
    max_length, seed = int(max_length), int(seed)

    def encode(batches):
        set_single_thread()
        backend = backend_from_json(tokenizer_json)   # once per worker process (cached)
        for rb in batches:
            if rb.num_rows:
                yield _encode_batch(rb, backend, max_length, seed)

    return encode


@dataclass
class TokenizeCounts:
    """What :func:`summarize` measured and decided: rows seen (kept + dropped), drops per
    reason, records per split, shards per split, and the plan as ranges of (split_key,
    record_id): ``test_last``, the last test record (None without a test split), and per split
    the first record of each shard after the first (``shard_starts``), with the records each
    shard gets (``shard_records``, checked against what the writers wrote)."""
    rows: int
    kept: int
    drops: dict[str, int]
    split_records: dict[str, int] = field(default_factory=dict)
    shard_counts: dict[str, int] = field(default_factory=dict)
    test_last: tuple[int, str] | None = None
    shard_starts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    shard_records: dict[str, list[int]] = field(default_factory=dict)


def summarize(tokenized, test_size: float | int, num_shards: int) -> TokenizeCounts:
    """One pass over :func:`tokenize_records`' output (the action that fills its cache): its
    narrow columns (split_key, record_id, length, drop_reason; never the ids) come to the driver
    as Arrow. There the rows are counted per drop reason, and the split
    (:func:`dollyflow.core.split.select_test`, exact for counts) and each split's token-balanced
    shard ranges (:func:`dollyflow.core.shards.plan_shards`) are worked out in numpy: no further
    Spark job, no Python worker. Both are ranges of (split_key, record_id), so the writers get
    them as a column expression (:func:`assign_shards`), not a join."""
    from dollyflow.core.shards import shard_count, shard_starts

    got = tokenized.select("split_key", "record_id", "length", "drop_reason").toArrow()
    reasons = {r["values"]: int(r["counts"]) for r in pc.value_counts(got.column("drop_reason")).to_pylist()}
    rows = got.filter(pc.is_null(got.column("drop_reason")))
    kept = reasons.pop(None, 0)
    counts = TokenizeCounts(rows=got.num_rows, kept=kept, drops=dict(sorted(reasons.items())))
    expect_equal("tokenize: kept records", ("counted by drop reason", kept), ("rows that came back", rows.num_rows))
    keys = rows.column("split_key").to_numpy()
    rids = np.asarray(rows.column("record_id").to_pylist(), dtype=object)
    lengths = rows.column("length").to_numpy()
    test = select_test(keys, rids, test_size)
    for name, mask in ((TEST, test), (TRAIN, ~test)):
        n = int(mask.sum())
        if n:
            counts.split_records[name] = n
            counts.shard_counts[name] = shard_count(num_shards, n)
            k, r = keys[mask], rids[mask]
            plan = core_plan_shards(lengths[mask], k, num_shards, r)
            counts.shard_starts[name] = shard_starts(plan, k, r)
            counts.shard_records[name] = np.bincount(plan, minlength=counts.shard_counts[name]).tolist()
            if name == TEST:
                last = np.lexsort((r.astype(str), k))[-1]
                counts.test_last = (int(k[last]), str(r[last]))
    return counts


def _at_or_after(key: int, rid: str):
    from pyspark.sql import functions as F
    k = F.col("split_key")
    return (k > F.lit(key)) | ((k == F.lit(key)) & (F.col("record_id") >= F.lit(rid)))


def assign_shards(kept, counts: TokenizeCounts):
    """Add ``split`` and ``shard`` to the kept rows from :func:`summarize`'s ranges: plain
    comparisons on (split_key, record_id), evaluated in the JVM where the rows already are."""
    from pyspark.sql import functions as F

    if counts.test_last is None:
        split = F.lit(TRAIN)
    else:
        key, rid = counts.test_last
        k = F.col("split_key")
        after = (k > F.lit(key)) | ((k == F.lit(key)) & (F.col("record_id") > F.lit(rid)))
        split = F.when(after, F.lit(TRAIN)).otherwise(F.lit(TEST))

    def shard_of(starts):
        expr = F.lit(0)
        for i, (key, rid) in enumerate(starts, 1):
            expr = F.when(_at_or_after(key, rid), F.lit(i)).otherwise(expr)
        return expr

    shard = shard_of(counts.shard_starts.get(TRAIN, []))
    if TEST in counts.shard_starts:
        shard = F.when(F.col("split") == F.lit(TEST), shard_of(counts.shard_starts[TEST])).otherwise(shard)
    return kept.withColumn("split", split).withColumn("shard", shard.cast("int"))


def _cores(spark, default: int) -> int:
    """Task slots of the session: N of a ``local[N]`` master, else the default parallelism (no
    more writer tasks than that: each Python task costs a round trip, a slot writes several
    shards)."""
    try:
        sc = spark.sparkContext
        m = re.fullmatch(r"local\[(\d+)(?:,\d+)?\]", sc.master or "")
        return int(m.group(1)) if m else int(sc.defaultParallelism)
    except Exception:  # Spark Connect
        return default


def write_outputs(kept, counts: TokenizeCounts, out_dir: str, edges: list[int], table_sink) -> list[dict]:
    """Give the kept rows their split and shard (:func:`assign_shards`), shuffle them to the
    writer tasks and write every (split, shard) as one shard file under ``out_dir`` (records ordered by split
    key) and, from the same Arrow rows, one Parquet file of the ``tokenized`` table through
    ``table_sink``. Returns, per shard, its stats (records, tokens, categories, histogram,
    bytes, sha256) with ``table_part``: the table file written (path, bytes, rows)."""
    out_dir = str(out_dir)
    plan = counts
    counts = dict(plan.shard_counts)
    total = sum(counts.values())
    cols = ["split", "shard", "split_key", "record_id", "category", "ids", "response_start", "length"]
    rows = assign_shards(kept, plan).select(*cols).repartition(max(1, total), "split", "shard")
    cores = _cores(kept.sparkSession, total)
    if cores < total:
        rows = rows.coalesce(max(1, cores))
    rows = rows.sortWithinPartitions("split", "shard", "split_key", "record_id")

    def flush(key, parts):
        t0 = time.perf_counter()
        split, shard = key
        table = pa.Table.from_batches(parts)
        table = table.append_column("input_ids", ids_to_list(table.column("ids"))).drop_columns(["ids"])
        t1 = time.perf_counter()
        stats = write_shard(table, join(out_dir, shard_file_name(split, shard, counts[split])), edges)
        t2 = time.perf_counter()
        stats.update(split=split, shard=int(shard),
                     table_part=list(table_sink.write(table, key=f"{split}-{int(shard):05d}")),
                     seconds={"arrow": round(t1 - t0, 4), "shard": round(t2 - t1, 4),
                              "table_part": round(time.perf_counter() - t2, 4)})
        return pa.RecordBatch.from_arrays([pa.array([json.dumps(stats)])], names=["stats"])

    def write(batches):
        key, parts = None, []
        for rb in batches:
            splits = rb.column("split").to_pylist()
            shards = rb.column("shard").to_pylist()
            start = 0
            for i in range(1, rb.num_rows + 1):
                if i == rb.num_rows or (splits[i], shards[i]) != (splits[start], shards[start]):
                    k = (splits[start], shards[start])
                    if key is not None and k != key:
                        yield flush(key, parts)
                        parts = []
                    key = k
                    parts.append(rb.slice(start, i - start))
                    start = i
        if key is not None:
            yield flush(key, parts)

    out = rows.mapInArrow(write, "stats string").collect()
    return [json.loads(r["stats"]) for r in out]
