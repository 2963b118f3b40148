"""ingest: annotation files -> bronze (valid, new records), quarantine (rejected lines), and one
accounting row in ingest_runs, where lines read = rows new + rows existing + rows quarantined.

Idempotent: bronze holds one row per record_id, so ingesting the same files again inserts
nothing and commits no new bronze version; a file with new lines adds only those.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from dollyflow.config import Config

BRONZE_COLUMNS = ["record_id", "instruction", "context", "response", "category", "source_file",
                  "source_line", "ingested_at", "run_id"]
QUARANTINE_COLUMNS = ["source_file", "source_line", "reason", "detail", "raw", "ingested_at", "run_id"]
BROADCAST_KEYS = 2_000_000   # rejected (record_id, pos) keys up to this many are broadcast
RUNS_DDL = ("run_id string, started_at timestamp, finished_at timestamp, inputs array<string>, "
            "files long, lines_read long, rows_new long, rows_existing long, rows_quarantined long, "
            "quarantined_by_reason map<string,long>, bronze_version long, settings string")


def run(cfg: Config, spark) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from dollyflow.core.storage import remove_dir
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.engine.ingest import parse_inputs

    store = DeltaStore(spark, cfg.tables)
    t = cfg.tables
    started = datetime.now(timezone.utc)
    parsed, files = parse_inputs(spark, cfg.ingest)
    # The parsed lines are read several times (accounting, keys, bronze, quarantine): parse once.
    # Path-based tables: a Parquet staging copy, whose narrow columns later reads scan cheaply;
    # catalog tables (no shared path known): Spark's cache.
    staging = _staging_path(cfg, store)
    if staging:
        parsed.write.mode("overwrite").parquet(staging)
        parsed = spark.read.parquet(staging)
    else:
        parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        by_reason = {r["reason"]: int(r["count"]) for r in parsed.groupBy("reason").count().collect()}
        lines_read = sum(by_reason.values())
        valid = by_reason.pop(None, 0)
        stamp = F.lit(started).cast("timestamp")

        # One row per record_id: its first occurrence in input order (file, then line), unless
        # bronze holds it already. Worked out on (record_id, pos) keys only; the full rows are
        # then filtered by an anti-join on the (usually few) rejected keys, broadcast when small.
        good = parsed.filter(F.col("reason").isNull())
        keys = good.select("record_id", "pos")
        rejected = (keys.groupBy("record_id")
                    .agg(F.min("pos").alias("first"), F.collect_list("pos").alias("seen"))
                    .filter(F.size("seen") > 1)
                    .select("record_id", F.explode(F.array_remove("seen", F.col("first"))).alias("pos")))
        bronze_version = store.version(t.bronze)
        if bronze_version is not None:
            held = store.read(t.bronze, bronze_version).select("record_id")
            rejected = rejected.unionByName(keys.join(held, "record_id", "left_semi"))
        rejected = rejected.persist(StorageLevel.MEMORY_AND_DISK)
        n_rejected = rejected.count()
        if n_rejected == 0:
            new = good
        elif n_rejected <= BROADCAST_KEYS:
            new = good.join(F.broadcast(rejected), ["record_id", "pos"], "left_anti")
        else:
            new = good.join(rejected, ["record_id", "pos"], "left_anti")
        new = new.withColumn("ingested_at", stamp).withColumn("run_id", F.lit(cfg.run_id)).select(*BRONZE_COLUMNS)
        # nothing new: no commit, so bronze keeps its version
        bronze_version = store.write(new, t.bronze, mode="append", job="ingest", run_id=cfg.run_id,
                                     skip_empty=True)
        rows_new = store.last_write_rows
        rejected.unpersist()

        quarantined = sum(by_reason.values())
        if quarantined or not store.exists(t.quarantine):
            bad = (parsed.filter(F.col("reason").isNotNull()).withColumn("ingested_at", stamp)
                   .withColumn("run_id", F.lit(cfg.run_id)).select(*QUARANTINE_COLUMNS))
            if store.exists(t.quarantine):  # the same bad line ingested again is not recorded twice
                bad = bad.join(store.read(t.quarantine).select("source_file", "source_line", "raw"),
                               ["source_file", "source_line", "raw"], "left_anti")
            store.write(bad, t.quarantine, mode="append", job="ingest", run_id=cfg.run_id, skip_empty=True)
    finally:
        parsed.unpersist()
        if staging:
            remove_dir(staging)

    summary = {
        "job": "ingest", "run_id": cfg.run_id, "inputs": [f for f, _, _ in files],
        "files": len(files), "lines_read": lines_read, "rows_new": rows_new,
        "rows_existing": valid - rows_new, "rows_quarantined": quarantined,
        "quarantined_by_reason": dict(sorted(by_reason.items())),
        "bronze": store.location(t.bronze), "bronze_version": bronze_version,
        "quarantine": store.location(t.quarantine), "backend": store.backend,
    }
    assert lines_read == summary["rows_new"] + summary["rows_existing"] + quarantined
    row = (cfg.run_id, started, datetime.now(timezone.utc), summary["inputs"], len(files), lines_read,
           rows_new, valid - rows_new, quarantined, summary["quarantined_by_reason"], bronze_version,
           json.dumps(cfg.to_dict()["ingest"], sort_keys=True))
    store.write(spark.createDataFrame([row], RUNS_DDL), t.ingest_runs, mode="append", job="ingest",
                run_id=cfg.run_id)
    summary["ingest_runs"] = store.location(t.ingest_runs)
    return summary


def _staging_path(cfg: Config, store) -> str | None:
    ref = store.ref(cfg.tables.bronze)
    if ref.path is None:
        return None
    return f"{ref.path.rsplit('/', 1)[0]}/_staging/{cfg.run_id}"


def main(argv: list[str] | None = None) -> int:
    from dollyflow.cli import run_job
    return run_job("ingest", argv)
