"""Exact and near-duplicate removal on Spark DataFrames (the engine side of the dedupe job).

Pipeline (every step is a DataFrame transformation; nothing is collected to the driver):

1. ``sign``: one ``mapInArrow`` pass over bronze computes, per record, the exact key (xxh3-128 of
   the normalised instruction/context/response), the MinHash signature of its word n-gram
   shingles (kept as 16-bit values for verification) and its LSH band keys
   (:mod:`dollyflow.core.text`, :mod:`dollyflow.core.minhash`); a 64-bit node id
   (xxhash64 of record_id) keys the graph. The result is persisted (disk) once.
2. candidates: band keys are exploded and hash-partitioned; per partition, numpy finds the
   buckets with two or more records and emits candidate pairs (all pairs up to
   ``all_pairs_bucket`` members, else a star on the smallest node id); pairs are made distinct.
3. verification: both compact signatures are joined onto each pair (only the signatures of
   records that are in some pair) and the estimated Jaccard is compared with the threshold.
   Exact duplicates need no separate pass: equal normalised text gives equal shingles, equal
   signatures and band keys, hence a verified pair of similarity 1.0 (records without any
   word get a single band key from their exact key, so only their exact copies meet them).
4. connected components of the verified pairs (alternating large-star / small-star rounds of
   Kiveris et al., "Connected Components in MapReduce and Beyond", 2014, on DataFrames, with
   ``localCheckpoint`` cutting the lineage each round), so chains of near copies form one cluster.
5. survivors: in every component the survivor is the earliest ``ingested_at``, then the
   smallest ``record_id``; ``cluster_id`` is the survivor's ``record_id``. Every other member is
   a duplicate of kind ``exact`` (same exact key as the survivor, similarity 1.0) or ``near``
   (similarity: estimated Jaccard to the survivor, which may be below the threshold for a
   member reached through a chain).

All choices depend only on record content and ids, never on partitioning or task order, so the
same bronze version gives the same silver and duplicates tables under any parallelism.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from dollyflow.core.minhash import (band_keys, bucket_pairs, compact, estimate_jaccard_compact,
                                    optimal_bands, permutations, signatures, signatures_from_buffer)
from dollyflow.core.text import document_and_key, utf8_buffer, token_hashes, shingle_hashes

ALGORITHM_VERSION = 1
_CHUNK_ROWS = 1024

SIGNED_DDL = ("record_id string, ingested_at timestamp, ekey binary, shingles int, sig binary, "
              "bands array<bigint>")
DUPLICATES_DDL = ("record_id string, cluster_id string, survivor_id string, kind string, "
                  "similarity double")


@dataclass(frozen=True)
class DedupeParams:
    """Everything that determines the result (recorded in dedupe-runs as JSON)."""

    ngram: int
    num_perm: int
    threshold: float
    bands: int
    rows: int
    seed: int
    all_pairs_bucket: int
    algorithm: int = ALGORITHM_VERSION

    @classmethod
    def from_config(cls, cfg) -> "DedupeParams":
        """From a ``DedupeConfig``; bands/rows default to the optimum for threshold/num_perm."""
        bands, rows = cfg.bands, cfg.rows
        if bands is None or rows is None:
            b, r = optimal_bands(float(cfg.threshold), int(cfg.num_perm),
                                 float(cfg.false_positive_weight), float(cfg.false_negative_weight))
            bands, rows = bands or b, rows or r
        if bands * rows > cfg.num_perm:
            raise ValueError(f"dedupe.bands*dedupe.rows = {bands * rows} exceeds num_perm {cfg.num_perm}")
        if cfg.ngram < 1:
            raise ValueError("dedupe.ngram must be >= 1")
        return cls(ngram=int(cfg.ngram), num_perm=int(cfg.num_perm), threshold=float(cfg.threshold),
                   bands=int(bands), rows=int(rows), seed=int(cfg.seed),
                   all_pairs_bucket=int(cfg.all_pairs_bucket))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# 1. signatures (mapInArrow)


def _fixed_width_buffer(column: pa.Array, width: int) -> memoryview | bytes:
    """The values of a binary column whose values all have ``width`` bytes, as one buffer."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    try:
        fixed = column.cast(pa.binary(width))
        return fixed.buffers()[1].to_pybytes()[fixed.offset * width:(fixed.offset + len(fixed)) * width]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return b"".join(column.to_pylist())


class Signer:
    """``mapInArrow`` function: bronze rows -> (record_id, ingested_at, ekey, shingles, sig, bands)."""

    def __init__(self, params: DedupeParams):
        self.params = params

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        p = self.params
        perms = permutations(p.num_perm, p.seed)
        for batch in batches:
            for start in range(0, batch.num_rows, _CHUNK_ROWS):
                yield self.sign(batch.slice(start, _CHUNK_ROWS), perms)

    def sign(self, batch: pa.RecordBatch, perms) -> pa.RecordBatch:
        p = self.params
        cols = {name: batch.column(name).to_pylist() for name in ("instruction", "context", "response")}
        docs, keys = [], []
        for ins, ctx, res in zip(cols["instruction"], cols["context"], cols["response"]):
            doc, key = document_and_key(ins, ctx, res)
            docs.append(doc)
            keys.append(key)
        n = len(docs)
        data, offsets = utf8_buffer(docs)
        tokens, token_docs = token_hashes(data, offsets)
        shingles, shingle_docs = shingle_hashes(tokens, token_docs, p.ngram)
        counts = np.bincount(shingle_docs, minlength=n).astype(np.int32)
        sigs = signatures(shingles, shingle_docs, n, perms)
        keys_arr = band_keys(sigs, p.bands, p.rows)
        bands = self.band_lists(keys_arr, counts, keys)
        small = np.ascontiguousarray(compact(sigs).astype("<u2"))
        width = p.num_perm * 2
        sig_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n,
                                                       [None, pa.py_buffer(small.tobytes())])
        return pa.RecordBatch.from_arrays(
            [batch.column("record_id"), batch.column("ingested_at"),
             pa.array(keys, type=pa.binary()), pa.array(counts, type=pa.int32()),
             sig_col.cast(pa.binary()), bands],
            names=["record_id", "ingested_at", "ekey", "shingles", "sig", "bands"])

    @staticmethod
    def band_lists(keys_arr: np.ndarray, counts: np.ndarray, exact_keys: list[bytes]) -> pa.ListArray:
        """Band keys per document; a document without shingles gets one key from its exact key."""
        n, bands = keys_arr.shape
        empty = np.flatnonzero(counts == 0)
        if empty.size == 0:
            flat = pa.array(keys_arr.reshape(-1), type=pa.int64())
            return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * bands, bands, dtype=np.int32)), flat)
        values, offsets = [], [0]
        for i in range(n):  # rare path: some documents of this batch have no shingles
            row = ([int.from_bytes(exact_keys[i][:8], "little", signed=True)] if counts[i] == 0
                   else keys_arr[i].tolist())
            values.extend(row)
            offsets.append(len(values))
        return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values, type=pa.int64()))


def sign(bronze: DataFrame, params: DedupeParams) -> DataFrame:
    """Per-record exact key, shingle count, compact signature and band keys."""
    cols = bronze.select("record_id", "ingested_at", "instruction", "context", "response")
    return cols.mapInArrow(Signer(params), SIGNED_DDL)


# ---------------------------------------------------------------------------------------------
# 2.-3. candidate pairs, verification


def node_id(column: str = "record_id") -> "F.Column":
    """64-bit node id of a record (xxhash64 of its record_id): joins and grouping on longs."""
    return F.xxhash64(F.col(column))


class BucketPairs:
    """``mapInArrow`` over one hash partition of (nid, bkey) rows: every bucket (rows sharing a
    band key) with at least two members yields its candidate pairs (a < b): all pairs when it has
    at most ``all_pairs_bucket`` members, else a star on its smallest node id. numpy sorts the
    partition once; pairs come from vectorised run arithmetic (no Python loop per bucket)."""

    def __init__(self, all_pairs_bucket: int):
        self.all_pairs_bucket = max(2, int(all_pairs_bucket))

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        keys, nids = [], []
        for batch in batches:
            keys.append(batch.column("bkey").to_numpy(zero_copy_only=False))
            nids.append(batch.column("nid").to_numpy(zero_copy_only=False))
        if keys:
            a, b = bucket_pairs(np.concatenate(keys), np.concatenate(nids), self.all_pairs_bucket)
        else:
            a = b = np.zeros(0, np.int64)
        yield pa.RecordBatch.from_arrays([pa.array(a, pa.int64()), pa.array(b, pa.int64())], names=["a", "b"])


def candidate_pairs(signed: DataFrame, all_pairs_bucket: int) -> DataFrame:
    """Distinct node pairs (a, b), a < b, sharing at least one LSH bucket: band keys are
    hash-partitioned (one shuffle of two longs per band), pairs found per partition."""
    rows = signed.where(F.col("bands").isNotNull()).select("nid", F.explode("bands").alias("bkey"))
    return (rows.repartition("bkey").mapInArrow(BucketPairs(all_pairs_bucket), "a long, b long")
            .distinct())


class Verifier:
    """``mapInArrow`` function: (a, b, sig_a, sig_b) -> (a, b, similarity) at/above threshold."""

    def __init__(self, num_perm: int, threshold: float, keep_all: bool = False):
        self.num_perm = num_perm
        self.threshold = threshold
        self.keep_all = keep_all

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        width = self.num_perm * 2
        for batch in batches:
            n = batch.num_rows
            sa = signatures_from_buffer(_fixed_width_buffer(batch.column("sig_a"), width), n, self.num_perm)
            sb = signatures_from_buffer(_fixed_width_buffer(batch.column("sig_b"), width), n, self.num_perm)
            sim = estimate_jaccard_compact(sa, sb) if n else np.zeros(0)
            keep = np.ones(n, dtype=bool) if self.keep_all else sim >= self.threshold
            idx = pa.array(np.flatnonzero(keep))
            yield pa.RecordBatch.from_arrays(
                [batch.column("a").take(idx), batch.column("b").take(idx), pa.array(sim[keep], pa.float64())],
                names=["a", "b", "similarity"])


def with_similarity(pairs: DataFrame, sigs: DataFrame, num_perm: int, threshold: float,
                    keep_all: bool = False) -> DataFrame:
    """Join both signatures onto (a, b) pairs and estimate their Jaccard similarity."""
    joined = (pairs.join(sigs.select(F.col("nid").alias("a"), F.col("sig").alias("sig_a")), "a")
              .join(sigs.select(F.col("nid").alias("b"), F.col("sig").alias("sig_b")), "b")
              .select("a", "b", "sig_a", "sig_b"))
    return joined.mapInArrow(Verifier(num_perm, threshold, keep_all), "a long, b long, similarity double")


# ---------------------------------------------------------------------------------------------
# 4. connected components


def _large_star(edges: DataFrame) -> DataFrame:
    both = edges.unionByName(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst")))
    low = both.groupBy("src").agg(F.least(F.min("dst"), F.col("src")).alias("m"))
    return (both.join(low, "src").where(F.col("dst") > F.col("src"))
            .select(F.col("dst").alias("src"), F.col("m").alias("dst")).distinct())


def _small_star(edges: DataFrame) -> DataFrame:
    low = edges.groupBy("src").agg(F.min("dst").alias("m"))
    joined = edges.join(low, "src")
    to_min = joined.where(F.col("dst") != F.col("m")).select(F.col("dst").alias("src"), F.col("m").alias("dst"))
    own = low.select("src", F.col("m").alias("dst"))
    return to_min.unionByName(own).distinct()


def connected_components(pairs: DataFrame, max_iterations: int = 40) -> DataFrame:
    """(node, component) for every node of the undirected edges ``pairs(a, b)``.

    component = smallest node id of the connected component. Alternating large-star/small-star
    until the edges form disjoint stars (every child has one parent, no parent is a child).
    """
    edges = (pairs.select(F.greatest("a", "b").alias("src"), F.least("a", "b").alias("dst"))
             .where(F.col("src") != F.col("dst")).distinct().localCheckpoint())
    for _ in range(max_iterations):
        edges = _small_star(_large_star(edges)).localCheckpoint()
        parents_as_children = edges.select(F.col("dst").alias("src")).distinct().join(edges.select("src"), "src")
        multi_parent = edges.groupBy("src").count().where(F.col("count") > 1)
        if parents_as_children.isEmpty() and multi_parent.isEmpty():
            roots = edges.select(F.col("dst").alias("node"), F.col("dst").alias("component")).distinct()
            return edges.select(F.col("src").alias("node"), F.col("dst").alias("component")).unionByName(roots)
    raise RuntimeError(f"connected components did not converge in {max_iterations} rounds")


# ---------------------------------------------------------------------------------------------
# 5. clusters, survivors, outputs


class _Clock:
    """Records seconds since the previous call under a step name (when given a dict)."""

    def __init__(self, timings: dict | None):
        self.timings, self.last = timings, time.time()

    def __call__(self, step: str) -> None:
        now = time.time()
        if self.timings is not None:
            self.timings[step] = round(now - self.last, 2)
        self.last = now


@dataclass
class DedupeFrames:
    duplicates: DataFrame      # record_id, cluster_id, survivor_id, kind, similarity (materialised)
    signed: DataFrame          # persisted per-record signatures (unpersist when done)
    input_rows: int            # bronze rows read
    verified_pairs: DataFrame  # (a, b, similarity) verified pairs of node ids (materialised)


def check_node_ids(components: DataFrame, members: DataFrame) -> None:
    """Fail loudly if a node id of the graph stands for two record ids (an xxhash64 collision,
    odds about n^2/2^65, 3e-8 at a million rows). Collisions among records that are in no
    candidate pair are harmless: those records are never looked up by node id."""
    if members.count() != components.count():
        raise RuntimeError("xxhash64 collision between two record_ids: dedupe cannot run on this table")


def find_duplicates(bronze: DataFrame, params: DedupeParams, max_cc_iterations: int = 40,
                    timings: dict | None = None) -> DedupeFrames:
    """All removed records of ``bronze`` with their cluster, survivor, kind and similarity.

    Exact duplicates need no separate pass: equal normalised text gives equal shingles, so equal
    signatures and band keys, so a verified pair of similarity 1.0. A record without any shingle
    (no word character at all) gets a single band key derived from its exact key instead, so that
    only its exact copies meet it.
    """
    clock = _Clock(timings)
    signed = sign(bronze, params).withColumn("nid", node_id()).persist(StorageLevel.DISK_ONLY)
    input_rows = signed.count()
    clock("sign")
    pairs = candidate_pairs(signed, params.all_pairs_bucket).localCheckpoint()
    clock("candidates")
    nodes = (pairs.select(F.col("a").alias("nid")).unionByName(pairs.select(F.col("b").alias("nid")))
             .distinct())
    node_sigs = signed.select("nid", "sig").join(nodes, "nid", "left_semi").localCheckpoint()
    verified = with_similarity(pairs, node_sigs, params.num_perm, params.threshold).localCheckpoint()
    clock("verify")
    components = connected_components(verified.select("a", "b"), max_cc_iterations).localCheckpoint()
    clock("components")
    members = (components.join(signed.select("nid", "record_id", "ingested_at", "ekey"),
                               components["node"] == signed["nid"])
               .select("nid", "record_id", "ingested_at", "ekey", "component")
               .localCheckpoint())
    check_node_ids(components, members)
    w = Window.partitionBy("component")
    members = members.withColumn("survivor", F.min(F.struct(
        F.col("ingested_at").alias("t"), F.col("record_id").alias("id"), F.col("ekey").alias("ekey"),
        F.col("nid").alias("nid"))).over(w))
    removed = (members.where(F.col("record_id") != F.col("survivor.id"))
               .select("record_id", "nid", F.col("survivor.id").alias("survivor_id"),
                       F.col("survivor.nid").alias("survivor_nid"),
                       F.when(F.col("ekey") == F.col("survivor.ekey"), F.lit("exact"))
                       .otherwise(F.lit("near")).alias("kind"))
               .localCheckpoint())
    clock("survivors")
    # Similarity of a near duplicate to its survivor (both are nodes, so both signatures are here).
    near = removed.where(F.col("kind") == "near")
    near_sim = with_similarity(near.select(F.col("nid").alias("a"), F.col("survivor_nid").alias("b")),
                               node_sigs, params.num_perm, params.threshold, keep_all=True)
    near = near.join(near_sim.select(F.col("a").alias("nid"), "similarity"), "nid", "left")
    exact = removed.where(F.col("kind") == "exact").withColumn("similarity", F.lit(1.0))
    duplicates = (exact.unionByName(near)
                  .select("record_id", F.col("survivor_id").alias("cluster_id"), "survivor_id", "kind",
                          F.col("similarity").cast("double").alias("similarity"))
                  .localCheckpoint())
    clock("duplicates")
    return DedupeFrames(duplicates=duplicates, signed=signed, input_rows=input_rows, verified_pairs=verified)


def silver_of(bronze: DataFrame, duplicates: DataFrame) -> DataFrame:
    """Bronze without the removed records (all bronze columns)."""
    return bronze.join(duplicates.select("record_id"), "record_id", "left_anti").select(*bronze.columns)


def summarize(duplicates: DataFrame, input_rows: int) -> dict:
    """Counts for the dedupe-runs row (small aggregations; one row per kind comes back)."""
    by_kind = {r["kind"]: int(r["n"]) for r in
               duplicates.groupBy("kind").agg(F.count(F.lit(1)).alias("n")).collect()}
    clusters = duplicates.select("cluster_id").distinct().count()
    removed = sum(by_kind.values())
    return {"input_rows": int(input_rows), "survivors": int(input_rows) - removed,
            "removed_exact": by_kind.get("exact", 0), "removed_near": by_kind.get("near", 0),
            "clusters": int(clusters)}
