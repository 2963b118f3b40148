"""Spark glue for the tokenize job: DataFrame -> DataFrame functions around the engine-free core.

- :func:`tokenize_records`: ``mapInArrow``; each Arrow batch (up to
  ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows) is encoded with one batched call of the
  Rust tokenizer. The tokenizer travels as its ``tokenizer.json`` text inside the task closure
  (PySpark broadcasts large commands by itself, and closures work with classic Spark and Spark
  Connect alike) and is built once per Python worker process (:func:`backend_from_json` caches it
  by sha256; Spark reuses workers), never per row or per batch.
- :func:`assign_split`: hash split of the core (:mod:`dollyflow.core.split`), exact for counts.
- :func:`plan_shards`: per split, the core's token-balanced plan (``applyInArrow``).
- :func:`write_shards`: each shard is written by one task, straight to the shard directory (a
  local path, a FUSE path such as ``/dbfs`` or ``/Volumes`` on clusters, or a pyarrow URI);
  the tasks return each shard's stats for the manifest.
"""
from __future__ import annotations

import json

import pyarrow as pa

from dollyflow.core.shards import plan_shards as core_plan_shards
from dollyflow.core.shards import shard_file_name, write_shard
from dollyflow.core.storage import join
from dollyflow.core.split import TEST, TRAIN, check_count, fraction_threshold, parse_test_size, split_keys
from dollyflow.core.tokens import backend_from_json, encode_records, set_single_thread

TOKENIZED_DDL = ("record_id string, category string, split_key long, input_ids array<int>, "
                 "response_start int, length int, drop_reason string")
TOKENIZED_ARROW = pa.schema([
    ("record_id", pa.string()), ("category", pa.string()), ("split_key", pa.int64()),
    ("input_ids", pa.list_(pa.int32())), ("response_start", pa.int32()), ("length", pa.int32()),
    ("drop_reason", pa.string()),
])
TABLE_COLUMNS = ["record_id", "split", "category", "input_ids", "response_start", "length"]


def _encode_batch(rb: pa.RecordBatch, backend, max_length: int, seed: int) -> pa.RecordBatch:
    rids = rb.column("record_id").to_pylist()
    enc = encode_records(backend, rb.column("instruction").to_pylist(), rb.column("context").to_pylist(),
                         rb.column("response").to_pylist(), max_length)
    arrays = [
        rb.column("record_id").cast(pa.string()),
        rb.column("category").cast(pa.string()),
        pa.array(split_keys(rids, seed), type=pa.int64()),
        pa.array(enc.input_ids, type=pa.list_(pa.int32())),
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
    """silver-shaped rows -> one row per record: split_key, input_ids, response_start, length and
    drop_reason (null when kept; input_ids and response_start are null for dropped records)."""
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


def drop_counts(tokenized) -> tuple[int, dict[str, int]]:
    """(records kept, {drop reason: count}) of :func:`tokenize_records`' output."""
    counts = {r["drop_reason"]: int(r["count"]) for r in tokenized.groupBy("drop_reason").count().collect()}
    kept = counts.pop(None, 0)
    return kept, dict(sorted(counts.items()))


def assign_split(kept, test_size: float, total: int):
    """Add ``split`` (train/test) by split key: a fraction is a key threshold; a count takes
    the ``n`` smallest ``(split_key, record_id)`` (one small top-n job), so it is exact and the
    same whatever the partitioning."""
    from pyspark.sql import functions as F

    mode, value = parse_test_size(test_size)
    if mode == "fraction":
        is_test = F.col("split_key") < F.lit(fraction_threshold(value))
    else:
        check_count(value, total)
        if value == 0:
            return kept.withColumn("split", F.lit(TRAIN))
        top = kept.select("split_key", "record_id").orderBy("split_key", "record_id").limit(value)
        last = top.orderBy(F.desc("split_key"), F.desc("record_id")).first()
        k, r = int(last["split_key"]), last["record_id"]
        is_test = (F.col("split_key") < F.lit(k)) | ((F.col("split_key") == F.lit(k)) & (F.col("record_id") <= F.lit(r)))
    return kept.withColumn("split", F.when(is_test, F.lit(TEST)).otherwise(F.lit(TRAIN)))


def plan_shards(split_df, num_shards: int):
    """(record_id, split, shard) for every record: per split, the core's plan balancing tokens
    over ``min(num_shards, records)`` shards."""
    num_shards = int(num_shards)

    def plan(table: pa.Table) -> pa.Table:
        shard = core_plan_shards(table.column("length").to_numpy(), table.column("split_key").to_numpy(),
                                 num_shards)
        return pa.table({"record_id": table.column("record_id"), "split": table.column("split"),
                         "shard": pa.array(shard, type=pa.int32())})

    return (split_df.select("record_id", "split", "split_key", "length")
            .groupBy("split").applyInArrow(plan, "record_id string, split string, shard int"))


#: Up to this many records the (record_id, split, shard) plan is broadcast to the join, so the
#: token rows are shuffled once (to their shard) instead of twice.
BROADCAST_PLAN_RECORDS = 5_000_000


def write_shards(split_df, plan, out_dir: str, shard_counts: dict[str, int], edges: list[int],
                 records: int | None = None) -> list[dict]:
    """Write every (split, shard) as one Parquet file under ``out_dir``, records ordered by split
    key; returns each shard's stats (records, tokens, categories, histogram, bytes, sha256)."""
    from pyspark.sql import functions as F

    out_dir = str(out_dir)
    counts = dict(shard_counts)
    total = sum(counts.values())
    cols = ["split", "shard", "split_key", "record_id", "category", "input_ids", "response_start", "length"]
    if records is not None and records <= BROADCAST_PLAN_RECORDS:
        plan = F.broadcast(plan)
    rows = (split_df.join(plan, ["record_id", "split"]).select(*cols)
            .repartition(max(1, total), "split", "shard")
            .sortWithinPartitions("split", "shard", "split_key"))

    def flush(key, parts):
        split, shard = key
        table = pa.Table.from_batches(parts)
        stats = write_shard(table, join(out_dir, shard_file_name(split, shard, counts[split])), edges)
        stats.update(split=split, shard=int(shard))
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

