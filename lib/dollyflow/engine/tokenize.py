"""Spark glue for the tokenize job: DataFrame -> DataFrame functions around the engine-free core.

- :func:`tokenize_records`: ``mapInArrow``; each Arrow batch (up to
  ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows) is encoded with one batched call of the
  Rust tokenizer. The tokenizer travels as its ``tokenizer.json`` text inside the task closure
  (PySpark broadcasts large commands by itself, and closures work with classic Spark and Spark
  Connect alike) and is built once per Python worker process (:func:`backend_from_json` caches it
  by sha256; Spark reuses workers), never per row or per batch.
- :func:`tokenize_to_staging`: the job's pass over silver: the same encoder, and each task
  writes its kept rows (token ids as int32 bytes, sorted by split key) as one Arrow IPC staging
  file under the run's shard directory and returns only the narrow columns of every record
  (record id, split key, length, drop reason, and the kept record's file and row).
- :func:`plan_outputs`: on the driver, from those narrow rows: drops per reason, the hash split
  of the core (:mod:`dollyflow.core.split`, exact for counts) and each split's token-balanced
  shard plan (:func:`dollyflow.core.shards.plan_shards`); a shard is a contiguous run of the
  (split_key, record_id) order, hence one row range of each staging file.
- :func:`build_version`: the job's build of one shard version from these steps, with every
  count checked stage to stage and the ``tokenized`` commit last.
- :func:`write_outputs`: one task per core writes whole shards: it reads just the record batches
  of the staging files holding a shard's rows and writes, from the same Arrow rows, the shard
  file (straight to the shard directory: a local path, a FUSE path such as ``/dbfs`` or
  ``/Volumes``, or a pyarrow URI) and the ``tokenized`` table's Parquet file for that shard
  (through the :class:`~dollyflow.engine.delta.PartSink` the Delta store gave it); the tasks
  return each shard's stats for the manifest and each table file for the commit.

Token ids never cross into the JVM: no cache, no shuffle, no second scan. Staging files are on
the shard storage, which every executor reaches already; a retried task writes a file of its
own (named by partition and attempt) and only the attempt whose rows the driver got is read.
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
import pyarrow.fs as pafs

from dollyflow.config import redact_uri
from dollyflow.core.counts import StepClock, expect_equal, expect_equal_maps
from dollyflow.core.shards import (TOKENIZER_DIR, build_manifest, histogram_edges, plan_shards as core_plan_shards,
                                   shard_count, shard_file_name, verify_shards, write_manifest, write_shard)
from dollyflow.core.split import TEST, TRAIN, select_test, split_keys
from dollyflow.core.storage import filesystem, is_shared, join, remove_dir, upload_dir
from dollyflow.core.prompt_format import DollyFormat, encode_records, from_dict as format_from_dict
from dollyflow.core.tokens import backend_from_json, set_single_thread

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


def _encode_batch(rb: pa.RecordBatch, backend, max_length: int, seed: int, fmt=None) -> pa.RecordBatch:
    rids = rb.column("record_id").to_pylist()
    enc = encode_records(backend, fmt or DollyFormat(), rb.column("instruction").to_pylist(),
                         rb.column("context").to_pylist(),
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


def tokenize_records(df, tokenizer_json: str, max_length: int, seed: int = 42, prompt: dict | None = None):
    """silver-shaped rows -> one row per record: split_key, ids (token ids as int32 bytes),
    response_start, length and drop_reason (null when kept; ids and response_start are null for
    dropped records)."""
    cols = ["record_id", "instruction", "context", "response", "category"]
    return df.select(*cols).mapInArrow(encoder(tokenizer_json, max_length, seed, prompt), TOKENIZED_DDL)


def encoder(tokenizer_json: str, max_length: int, seed: int = 42, prompt: dict | None = None):
    """The mapInArrow function of :func:`tokenize_records`: Arrow batches of silver columns ->
    Arrow batches of :data:`TOKENIZED_ARROW`. ``prompt``: the prompt format as
    :meth:`~dollyflow.core.prompt_format.ChatFormat.to_dict` gives it (None: Dolly's)."""
    max_length, seed = int(max_length), int(seed)

    def encode(batches):
        set_single_thread()
        backend = backend_from_json(tokenizer_json)   # once per worker process (cached)
        fmt = format_from_dict(prompt)
        for rb in batches:
            if rb.num_rows:
                yield _encode_batch(rb, backend, max_length, seed, fmt)

    return encode


#: What each tokenize task sends back for a record (about 50 bytes, never its token ids): the
#: narrow columns the driver plans from, and where the kept record's row is in the staging files.
NARROW_DDL = "record_id string, split_key long, length int, drop_reason string, part long, row int"
NARROW_ARROW = pa.schema([("record_id", pa.string()), ("split_key", pa.int64()), ("length", pa.int32()),
                          ("drop_reason", pa.string()), ("part", pa.int64()), ("row", pa.int32())])
#: Under the run's shard directory (shared storage: executors write there already): one Arrow IPC
#: file per tokenize task attempt, removed once the shards and table files are written.
STAGING_DIR = "_staging"
#: Rows per record batch of a staging file, so a writer reads only the batches its rows are in.
STAGING_BATCH_ROWS = 2048
_STAGING_SORT = [("split_key", "ascending"), ("record_id", "ascending")]


def staging_name(part: int) -> str:
    """The staging file of a task attempt: ``part`` = partition id << 16 | attempt number, so a
    retried or speculative attempt never overwrites the file of the attempt whose rows count."""
    return f"part-{int(part) >> 16:05d}-{int(part) & 0xFFFF}.arrow"


def _open_readable(path: str):
    """A random-access file: memory-mapped on a plain local disk, read through the filesystem
    elsewhere (object stores, and FUSE mounts such as /Volumes where mmap is not to be relied on)."""
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem) and not is_shared(path):
        return pa.memory_map(p)
    return fs.open_input_file(p)


def tokenize_to_staging(df, tokenizer_json: str, max_length: int, seed: int, staging_dir: str,
                        prompt: dict | None = None):
    """silver-shaped rows -> :data:`NARROW_DDL` rows, one per record. Each task tokenizes its
    rows (:func:`encoder`), writes the kept ones -- sorted by (split_key, record_id), token ids
    as int32 bytes -- as one Arrow IPC file under ``staging_dir`` and returns for every record
    its narrow columns, with ``part``/``row`` locating a kept record in that file (null for a
    dropped one). The token ids never go through the JVM."""
    cols = ["record_id", "instruction", "context", "response", "category"]
    return df.select(*cols).mapInArrow(stager(tokenizer_json, max_length, seed, str(staging_dir), prompt), NARROW_DDL)


def stager(tokenizer_json: str, max_length: int, seed: int, staging_dir: str, prompt: dict | None = None):
    """The mapInArrow function of :func:`tokenize_to_staging`."""
    encode = encoder(tokenizer_json, max_length, seed, prompt)

    def stage(batches):
        from pyspark import TaskContext

        ctx = TaskContext.get()
        part = (ctx.partitionId() << 16) | (ctx.attemptNumber() & 0xFFFF) if ctx is not None else 0
        encoded = [rb for rb in encode(batches)]
        if not encoded:
            return
        table = pa.Table.from_batches(encoded, schema=TOKENIZED_ARROW)
        dropped = table.filter(pc.is_valid(table.column("drop_reason")))
        kept = table.filter(pc.is_null(table.column("drop_reason"))).drop_columns(["drop_reason"])
        kept = kept.take(pc.sort_indices(kept, sort_keys=_STAGING_SORT)).combine_chunks()
        if kept.num_rows:
            fs, path = filesystem(join(staging_dir, staging_name(part)))
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as out, pa.ipc.new_file(out, kept.schema) as w:
                w.write_table(kept, max_chunksize=STAGING_BATCH_ROWS)
        n = kept.num_rows
        yield pa.RecordBatch.from_arrays(
            [kept.column("record_id").combine_chunks(), kept.column("split_key").combine_chunks(),
             kept.column("length").combine_chunks(), pa.nulls(n, pa.string()),
             pa.array(np.full(n, part, dtype=np.int64)), pa.array(np.arange(n, dtype=np.int32))],
            schema=NARROW_ARROW)
        if dropped.num_rows:
            m = dropped.num_rows
            yield pa.RecordBatch.from_arrays(
                [dropped.column(c).combine_chunks() for c in ("record_id", "split_key", "length", "drop_reason")]
                + [pa.nulls(m, pa.int64()), pa.nulls(m, pa.int32())], schema=NARROW_ARROW)

    return stage


@dataclass
class TokenizeCounts:
    """What :func:`plan_outputs` measured and decided: rows seen (kept + dropped), drops per
    reason, records per split, shards per split, the records each shard gets (checked against
    what the writers wrote) and where they are: ``pieces[(split, shard)]`` lists the row ranges
    ``(part, lo, hi)`` of the staging files that make up the shard."""
    rows: int
    kept: int
    drops: dict[str, int]
    split_records: dict[str, int] = field(default_factory=dict)
    shard_counts: dict[str, int] = field(default_factory=dict)
    shard_records: dict[str, list[int]] = field(default_factory=dict)
    pieces: dict[tuple[str, int], list[tuple[int, int, int]]] = field(default_factory=dict)


def plan_outputs(narrow: pa.Table, test_size: float | int, num_shards: int) -> TokenizeCounts:
    """On the driver, from :func:`tokenize_to_staging`'s narrow rows (as Arrow): count the rows
    per drop reason, split the kept ones (:func:`dollyflow.core.split.select_test`, exact for
    counts) and plan each split's token-balanced shards
    (:func:`dollyflow.core.shards.plan_shards`). A split is a prefix (test) or the rest (train) of
    the (split_key, record_id) order and a shard a contiguous run of its split, so within a
    staging file -- sorted the same way -- a shard's records are one row range; checked."""

    reasons = {r["values"]: int(r["counts"]) for r in pc.value_counts(narrow.column("drop_reason")).to_pylist()}
    rows = narrow.filter(pc.is_null(narrow.column("drop_reason")))
    kept = reasons.pop(None, 0)
    counts = TokenizeCounts(rows=narrow.num_rows, kept=kept, drops=dict(sorted(reasons.items())))
    expect_equal("tokenize: kept records", ("counted by drop reason", kept), ("rows that came back", rows.num_rows))
    if kept == 0:        # nothing to split or shard: the caller says so (NoRecordsToTokenize)
        return counts
    keys = rows.column("split_key").to_numpy()
    rids = np.asarray(rows.column("record_id").to_pylist(), dtype=object)
    lengths = rows.column("length").to_numpy()
    parts = rows.column("part").to_numpy()
    at = rows.column("row").to_numpy()
    test = select_test(keys, rids, test_size)
    for name, mask in ((TEST, test), (TRAIN, ~test)):
        n = int(mask.sum())
        if not n:
            continue
        counts.split_records[name] = n
        counts.shard_counts[name] = shard_count(num_shards, n)
        plan = core_plan_shards(lengths[mask], keys[mask], num_shards, rids[mask])
        counts.shard_records[name] = np.bincount(plan, minlength=counts.shard_counts[name]).tolist()
        p, r = parts[mask], at[mask]
        order = np.lexsort((r, p, plan))                  # by shard, then file, then row
        plan, p, r = plan[order], p[order], r[order]
        bounds = np.flatnonzero((np.diff(plan) != 0) | (np.diff(p) != 0)) + 1
        for lo_i, hi_i in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [n]])):
            lo, hi = int(r[lo_i]), int(r[hi_i - 1]) + 1
            if hi - lo != hi_i - lo_i:
                raise RuntimeError(f"tokenize: staging file {staging_name(int(p[lo_i]))} is not in (split_key, "
                                   f"record_id) order: shard {name}-{int(plan[lo_i])} has {hi_i - lo_i} of its "
                                   f"rows spread over rows {lo}..{hi - 1}")
            counts.pieces.setdefault((name, int(plan[lo_i])), []).append((int(p[lo_i]), lo, hi))
    return counts


def read_pieces(staging_dir: str, pieces: list[tuple[int, int, int]], readers: dict) -> pa.Table:
    """The rows ``(part, lo, hi)`` of the staging files, in (split_key, record_id) order. Only
    the record batches holding them are read; ``readers`` caches the open files of a task."""
    tables = []
    for part, lo, hi in pieces:
        if hi <= lo:
            continue
        reader = readers.get(part)
        if reader is None:
            reader = readers[part] = pa.ipc.open_file(_open_readable(join(staging_dir, staging_name(part))))
        first, last = lo // STAGING_BATCH_ROWS, (hi - 1) // STAGING_BATCH_ROWS
        got = pa.Table.from_batches([reader.get_batch(b) for b in range(first, last + 1)])
        tables.append(got.slice(lo - first * STAGING_BATCH_ROWS, hi - lo))
    table = pa.concat_tables(tables) if tables else TOKENIZED_ARROW.remove(6).empty_table()
    expect_equal("tokenize: staged rows read", ("rows asked for", sum(max(0, h - lo) for _, lo, h in pieces)),
                 ("rows read", table.num_rows))
    return table.take(pc.sort_indices(table, sort_keys=_STAGING_SORT)) if len(tables) > 1 else table


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


def write_outputs(spark, counts: TokenizeCounts, staging_dir: str, out_dir: str, edges: list[int],
                  table_sink) -> list[dict]:
    """Write every (split, shard) of the plan from its staging rows (:func:`read_pieces`): one
    shard file under ``out_dir`` (records ordered by split key) and, from the same Arrow rows,
    one Parquet file of the ``tokenized`` table through ``table_sink``. One Spark task per core
    (never more than shards), each writing whole shards, the largest first. Returns, per shard,
    its stats (records, tokens, categories, histogram, bytes, sha256) with ``table_part``: the
    table file written (path, bytes, rows)."""
    out_dir, staging_dir = str(out_dir), str(staging_dir)
    shard_counts = dict(counts.shard_counts)
    shards = sorted(((counts.shard_records[s][i], s, i) for s, n in shard_counts.items() for i in range(n)),
                    reverse=True)
    tasks = max(1, min(len(shards), _cores(spark, len(shards))))
    work: list[list[tuple[str, int, list]]] = [[] for _ in range(tasks)]
    load = [0] * tasks
    for records, split, shard in shards:                     # largest first onto the least loaded
        t = load.index(min(load))
        load[t] += records
        work[t].append((split, shard, counts.pieces.get((split, shard), [])))

    def write_one(split: str, shard: int, table: pa.Table) -> pa.RecordBatch:
        t0 = time.perf_counter()
        table = table.append_column("input_ids", ids_to_list(table.column("ids"))).drop_columns(["ids"])
        t1 = time.perf_counter()
        stats = write_shard(table, join(out_dir, shard_file_name(split, shard, shard_counts[split])), edges)
        t2 = time.perf_counter()
        table = table.append_column("split", pa.array([split] * table.num_rows, type=pa.string()))
        stats.update(split=split, shard=int(shard),
                     table_part=list(table_sink.write(table, key=f"{split}-{int(shard):05d}")),
                     seconds={"arrow": round(t1 - t0, 4), "shard": round(t2 - t1, 4),
                              "table_part": round(time.perf_counter() - t2, 4)})
        return pa.RecordBatch.from_arrays([pa.array([json.dumps(stats)])], names=["stats"])

    def write(batches):
        readers: dict = {}
        for rb in batches:
            for task in rb.column("id").to_pylist():
                for split, shard, pieces in work[task]:
                    yield write_one(split, shard, read_pieces(staging_dir, pieces, readers))

    out = spark.range(tasks, numPartitions=tasks).mapInArrow(write, "stats string").collect()
    return [json.loads(r["stats"]) for r in out]


class NoRecordsToTokenize(RuntimeError):
    """Silver, at the version read, gives no record to tokenize: it has no rows, or every one was
    dropped. Raised before anything is committed: the pointer, the shard versions and the
    ``tokenized`` table stay as they were."""


def _no_records(store, table: str, version: int, rows: int, drops: dict, shard_dir: str) -> str:
    where = f"silver {redact_uri(store.location(table))} v{version}"
    why = "has no rows" if rows == 0 else \
        f"has {rows} rows and every one was dropped (" + ", ".join(f"{k} {v}" for k, v in sorted(
            drops.items(), key=lambda kv: (-kv[1], kv[0]))) + ")"
    return (f"no record to tokenize: {where} {why}; nothing was written: the shards under "
            f"{redact_uri(shard_dir.rsplit('/', 1)[0])} (and their LATEST.json pointer) and the tokenized "
            "table stay as they were")


def build_version(cfg, spark, store, silver_version: int, shard_dir: str, settings: dict, tok_dir: str,
                  tok_info: dict, build: dict, timings: dict) -> dict:
    """The tokenize job's build of one shard version (``cfg`` is the job's
    :class:`~dollyflow.config.Config`): tokenize silver at ``silver_version`` once; write the
    shards and the ``tokenized`` table's files in one pass, check every count, verify the shards,
    commit the table; return the manifest (written into ``shard_dir``). ``timings`` gets each
    step's seconds. On failure the table files written are discarded; removing ``shard_dir`` is
    the caller's."""

    t, tk = cfg.tables, cfg.tokenize
    src = getattr(t, tk.source_table)     # curated (the filter job's output) or silver
    clock = StepClock(timings)
    max_length = settings["max_length"]
    upload_dir(tok_dir, join(shard_dir, TOKENIZER_DIR))
    with open(f"{tok_dir}/tokenizer.json", encoding="utf-8") as f:
        tokenizer_json = f.read()     # the workers rebuild exactly the saved tokenizer

    silver_rows = store.count(src, silver_version)       # from silver's Delta log, not from us
    if silver_rows == 0:
        raise NoRecordsToTokenize(_no_records(store, src, silver_version, 0, {}, shard_dir))
    silver = with_parallelism(store.read(src, silver_version))
    staging = join(shard_dir, STAGING_DIR)
    sink = None
    clock("prepare")
    try:
        # tokenizes (once): the kept rows go to staging files, their narrow columns come here
        narrow = tokenize_to_staging(silver, tokenizer_json, max_length, tk.seed, staging,
                                     settings.get("prompt")).toArrow()
        clock("tokenize")
        counts = plan_outputs(narrow, tk.test_size, tk.num_shards)
        expect_equal(f"tokenize: silver v{silver_version}",
                     (f"rows of {store.location(src)} v{silver_version}", silver_rows),
                     (f"rows tokenized ({counts.kept}) + dropped ({sum(counts.drops.values())}: {counts.drops})",
                      counts.rows))
        if counts.kept == 0:
            raise NoRecordsToTokenize(_no_records(store, src, silver_version, counts.rows, counts.drops,
                                                  shard_dir))
        clock("plan")
        edges = histogram_edges(max_length)
        sink = store.part_sink(t.tokenized, TABLE_ARROW)
        stats = write_outputs(spark, counts, staging, shard_dir, edges, sink)
        remove_dir(staging, under=shard_dir)
        clock("write")
        timings["write_tasks"] = {k: round(sum(st["seconds"][k] for st in stats), 3) for k in stats[0]["seconds"]}
        by_split: dict[str, list[dict]] = {s: [] for s in counts.split_records}
        for st in stats:
            by_split.setdefault(st["split"], []).append(st)
        expect_equal_maps("tokenize: records per split", ("the split", counts.split_records),
                          ("the shards written", {s: sum(x["records"] for x in v) for s, v in by_split.items()}))
        expect_equal_maps("tokenize: records per shard",
                          ("the shard plan", {f"{s}-{i}": n for s, v in counts.shard_records.items()
                                              for i, n in enumerate(v)}),
                          ("the shards written", {f"{st['split']}-{st['shard']}": st["records"] for st in stats}))
        parts = [tuple(st["table_part"]) for st in stats]
        expect_equal("tokenize: tokenized table files", ("records kept", counts.kept),
                     ("rows of the table files written", sum(p[2] for p in parts)))
        source = {"table": src, "location": store.location(src), "version": silver_version,
                  "rows": silver_rows, "backend": store.backend}
        tok = {**tok_info, "name": settings["tokenizer"], "dir": TOKENIZER_DIR}
        manifest = build_manifest(source=source, tokenizer=tok, max_length=max_length, seed=tk.seed,
                                  test_size=tk.test_size, edges=edges, split_shards=by_split, drops=counts.drops,
                                  run_id=cfg.run_id, prompt_format=settings.get("prompt_info", {}).get("format", "dolly"))
        manifest["prompt"] = settings.get("prompt_info", {"format": "dolly", "system": ""})
        manifest["settings"] = build
        expect_equal("tokenize: manifest", ("records kept", counts.kept), ("manifest records", manifest["records"]))
        write_manifest(shard_dir, manifest)
        problems = verify_shards(shard_dir)                       # re-reads every shard
        if problems:
            raise RuntimeError(f"the shards just written to {shard_dir} do not match their manifest: "
                               + "; ".join(problems[:10]))
        clock("verify")
        commit = store.commit_parts(sink, parts, t.tokenized, mode="overwrite", job="tokenize", run_id=cfg.run_id)
        sink = None
        expect_equal("tokenize: tokenized table", ("records kept", counts.kept),
                     (f"rows of {store.location(t.tokenized)} v{commit.version} (its commit)", commit.rows))
    except BaseException:
        if sink is not None:
            store.discard_parts(sink)
        raise
    manifest["tokenized_table"] = {"table": t.tokenized, "location": store.location(t.tokenized),
                                   "version": commit.version}
    write_manifest(shard_dir, manifest)
    clock("commit")
    return manifest
