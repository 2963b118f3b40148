"""Exact and near-duplicate removal on Spark DataFrames (the engine side of the dedupe job).

The near-duplicate rule. A record has two parts: its *qa part*, the instruction and the response
joined (what is asked and what is answered), and its *context*, the passage. Each part is
shingled into word n-grams on its own (:func:`dollyflow.core.text.part_shingles`) and gets its
own MinHash signature. Two records are near duplicates when

    J(qa_a, qa_b) >= threshold  and  (J(ctx_a, ctx_b) >= threshold  or  neither has a context),

with J the MinHash estimate of the Jaccard similarity of the two parts' shingle sets. A context
without any word counts as no context; a record with a context never matches one without.

So a shared passage alone never makes a duplicate. In databricks-dolly-15k, closed_qa,
information_extraction and summarization records often ask different questions about the same
Wikipedia passage; shingled as one text, two such records over the sample's longest passage (658
words) score J = 0.92 (MinHash estimate 0.95), and one was removed. By parts their qa J is 0.0.
The passage cannot help either: a near copy needs a near-identical question and answer whatever
the passage, exactly as a record without context always did (for those, the qa part is the whole
record, so their result is unchanged). The consequence for short question-answers: one replaced
word in a 12-bigram qa part gives J = 10/14 = 0.71, at the threshold, where a long shared passage
used to lift it to 0.97. The instruction and the response are compared as one text, not field by
field: a short instruction with one edited word would fall below the threshold on its own
(9 bigrams, one replaced word: 7/11) while the question-answer as a whole stays a near copy. The
limit of that choice: with a long instruction and short responses, the instruction dominates
J(qa), so two different one-line answers to one long, identical instruction can still meet the
threshold.

Pipeline (every step is a DataFrame transformation; nothing is collected to the driver):

1. ``sign``: one ``mapInArrow`` pass over bronze computes, per record, the exact key (xxh3-128 of
   the normalised instruction/context/response), the MinHash signatures of its two parts (kept
   as 16-bit values for verification; the context one is null without a context) and LSH band
   keys of the *qa* signature only (:mod:`dollyflow.core.text`, :mod:`dollyflow.core.minhash`),
   so the passage never makes two records candidates; a 64-bit node id (xxhash64 of record_id)
   keys the graph. The result is persisted (disk) once.
2. candidates: band keys are exploded and hash-partitioned; per partition, numpy finds the
   buckets with two or more records and emits candidate pairs (all pairs up to
   ``all_pairs_bucket`` members, else a star on the smallest node id); pairs are made distinct.
3. verification: both parts' compact signatures are joined onto each pair (only those of records
   that are in some pair) and a pair is kept when both parts meet the threshold (the rule
   above); its similarity is ``min(J(qa), J(context))``, the weaker part. Exact duplicates need
   no separate pass: equal normalised fields give equal shingles, equal signatures and band
   keys, hence a verified pair of similarity 1.0 (a record whose qa part has no word gets a
   single band key from its exact key, so only its exact copies meet it).
4. connected components of the verified pairs (alternating large-star / small-star rounds of
   Kiveris et al., "Connected Components in MapReduce and Beyond", 2014, on DataFrames, with
   ``localCheckpoint`` cutting the lineage each round), so chains of near copies form one cluster.
   Every edge of a chain is a verified pair, so a chain never links two different questions
   through their passage: each link is a near copy of both the question-answer and the passage.
5. survivors: in every component the survivor is the earliest ``ingested_at``, then the
   smallest ``record_id``; ``cluster_id`` is the survivor's ``record_id``. Every other member is
   a duplicate of kind ``exact`` (same exact key as the survivor, similarity 1.0) or ``near``
   (similarity: ``min(J(qa), J(context))`` to the survivor, which may be below the threshold for
   a member reached through a chain).

All choices depend only on record content and ids, never on partitioning or task order, so the
same bronze version gives the same silver and duplicates tables under any parallelism.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from dollyflow.core.counts import StepClock
from dollyflow.core.minhash import (band_keys, bucket_pairs, compact, optimal_bands, part_similarity,
                                    permutations, signatures, signatures_from_buffer)
from dollyflow.core.text import fields_and_key, part_shingles

# 2: near duplicates compare the instruction+response part and the context part separately
# (1: one signature of the three fields shingled as one text).
ALGORITHM_VERSION = 2
_CHUNK_ROWS = 1024

SIGNED_DDL = ("record_id string, ingested_at timestamp, ekey binary, sig binary, csig binary, "
              "bands array<bigint>")


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
    """``mapInArrow`` function: bronze rows -> (record_id, ingested_at, ekey, sig, csig, bands).

    ``sig``: compact signature of the qa part (instruction + response); ``csig``: of the context,
    null when the context has no word; ``bands``: LSH band keys of ``sig``."""

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
        n = batch.num_rows
        ins, ctx, res, keys = [], [], [], []
        for i, c, r in zip(cols["instruction"], cols["context"], cols["response"]):
            fi, fc, fr, key = fields_and_key(i, c, r)
            ins.append(fi)
            ctx.append(fc)
            res.append(fr)
            keys.append(key)
        shingles, parts = part_shingles(ins, ctx, res, p.ngram)
        counts = np.bincount(parts, minlength=2 * n)
        sigs = signatures(shingles, parts, 2 * n, perms)  # rows 0..n-1: qa parts; n..2n-1: contexts
        qa_counts, has_ctx = counts[:n], counts[n:] > 0
        bands = self.band_lists(band_keys(sigs[:n], p.bands, p.rows), qa_counts, keys)
        small = np.ascontiguousarray(compact(sigs).astype("<u2"))
        return pa.RecordBatch.from_arrays(
            [batch.column("record_id"), batch.column("ingested_at"), pa.array(keys, type=pa.binary()),
             self.binary_column(small[:n], None), self.binary_column(small[n:], has_ctx), bands],
            names=["record_id", "ingested_at", "ekey", "sig", "csig", "bands"])

    @staticmethod
    def binary_column(rows: np.ndarray, valid: np.ndarray | None) -> pa.Array:
        """One binary value per row of a contiguous uint16 matrix; null (and no bytes at all)
        where ``valid`` is False."""
        n, width = rows.shape[0], rows.shape[1] * 2
        if valid is None or valid.all():
            fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(rows.tobytes())])
            return fixed.cast(pa.binary())
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(valid * np.int32(width), out=offsets[1:])
        validity = pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
        return pa.BinaryArray.from_buffers(pa.binary(), n, [validity, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(rows[valid].tobytes())],
                                           null_count=int(n - valid.sum()))

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
    """Per-record exact key, compact signatures of both parts and band keys of the qa part."""
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


def _signature_rows(column: pa.Array, n: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, num_perm) compact signatures of a nullable binary column and its validity mask
    (rows of null values are zeros)."""
    width = num_perm * 2
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count == 0:
        return signatures_from_buffer(_fixed_width_buffer(column, width), n, num_perm), np.ones(n, dtype=bool)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    filled = column.fill_null(pa.scalar(bytes(width), pa.binary()))
    return signatures_from_buffer(_fixed_width_buffer(filled, width), n, num_perm), valid


class Verifier:
    """``mapInArrow`` function: (a, b, sig_a, sig_b, csig_a, csig_b) -> (a, b, similarity), the
    pairs whose qa part and context both meet the threshold (all pairs when ``keep_all``);
    similarity = min(J(qa), J(context)) (:func:`dollyflow.core.minhash.part_similarity`)."""

    def __init__(self, num_perm: int, threshold: float, keep_all: bool = False):
        self.num_perm = num_perm
        self.threshold = threshold
        self.keep_all = keep_all

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            n = batch.num_rows
            qa_a, _ = _signature_rows(batch.column("sig_a"), n, self.num_perm)
            qa_b, _ = _signature_rows(batch.column("sig_b"), n, self.num_perm)
            ctx_a, has_a = _signature_rows(batch.column("csig_a"), n, self.num_perm)
            ctx_b, has_b = _signature_rows(batch.column("csig_b"), n, self.num_perm)
            qa, ctx = part_similarity(qa_a, qa_b, ctx_a, ctx_b, has_a, has_b)
            sim = np.minimum(qa, ctx)
            keep = np.ones(n, dtype=bool) if self.keep_all else sim >= self.threshold
            idx = pa.array(np.flatnonzero(keep))
            yield pa.RecordBatch.from_arrays(
                [batch.column("a").take(idx), batch.column("b").take(idx), pa.array(sim[keep], pa.float64())],
                names=["a", "b", "similarity"])


def with_similarity(pairs: DataFrame, sigs: DataFrame, num_perm: int, threshold: float,
                    keep_all: bool = False) -> DataFrame:
    """Join both records' signatures (``nid, sig, csig``) onto (a, b) pairs and keep the pairs
    that are near duplicates (all when ``keep_all``), with their similarity."""
    joined = (pairs.join(sigs.select(F.col("nid").alias("a"), F.col("sig").alias("sig_a"),
                                     F.col("csig").alias("csig_a")), "a")
              .join(sigs.select(F.col("nid").alias("b"), F.col("sig").alias("sig_b"),
                                F.col("csig").alias("csig_b")), "b")
              .select("a", "b", "sig_a", "sig_b", "csig_a", "csig_b"))
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

    Near duplicates follow the rule of the module docstring (qa part and context each at or above
    the threshold). Exact duplicates need no separate pass: equal normalised fields give equal
    shingles, so equal signatures and band keys, so a verified pair of similarity 1.0. A record
    whose qa part has no shingle (no word character in instruction and response) gets a single
    band key derived from its exact key instead, so that only its exact copies meet it.
    """
    clock = StepClock(timings, digits=2)
    signed = sign(bronze, params).withColumn("nid", node_id()).persist(StorageLevel.DISK_ONLY)
    input_rows = signed.count()
    clock("sign")
    pairs = candidate_pairs(signed, params.all_pairs_bucket).localCheckpoint()
    clock("candidates")
    nodes = (pairs.select(F.col("a").alias("nid")).unionByName(pairs.select(F.col("b").alias("nid")))
             .distinct())
    node_sigs = signed.select("nid", "sig", "csig").join(nodes, "nid", "left_semi").localCheckpoint()
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
