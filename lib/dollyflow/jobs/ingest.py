"""ingest: annotation files -> bronze (valid, new records), quarantine (rejected lines), and one
accounting row in ingest_runs, where lines read = rows new + rows existing + rows quarantined.

Every term is measured from the data it describes: lines read and rows quarantined from the
parsed lines, rows existing as the valid lines whose record_id repeats an earlier line of the
input or is already in bronze (counted from the keys), rows new from bronze's own commit. If
they do not add up the job fails, naming the numbers. Files of a directory or glob that are
not read are listed with the reason (``skipped_files``).

An input that gives no valid record fails the run (:class:`NoRecordsError`, naming the files and
the top quarantine reasons with their counts): one with no line at all (an empty file), or one
whose every line was quarantined. It fails only after the quarantine rows and the run's
``ingest_runs`` row are committed, so nothing is lost. Valid lines that bronze holds already are
no error: that is an idempotent re-run.

Idempotent and safe to run concurrently: bronze holds one row per record_id. New rows are
inserted with an insert-only merge on record_id, so ingesting the same files again inserts
nothing and commits no new bronze version, a file with new lines adds only those, and two runs
over overlapping files at the same time still add each record once.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from dollyflow.config import Config, redact_uri
from dollyflow.core.counts import expect_equal
from dollyflow.core.storage import check_reachable, check_within, remove_dir
from dollyflow.engine.delta import DeltaStore
from dollyflow.engine.ingest import parse_inputs, rejected_keys
from dollyflow.engine.session import master_of

BRONZE_COLUMNS = ["record_id", "instruction", "context", "response", "category", "source_file",
                  "source_line", "ingested_at", "run_id"]
QUARANTINE_COLUMNS = ["source_file", "source_line", "reason", "detail", "raw", "ingested_at", "run_id"]
QUARANTINE_KEYS = ["source_file", "source_line", "raw"]
BROADCAST_KEYS = 2_000_000   # rejected (record_id, pos) keys up to this many are broadcast
RUNS_DDL = ("run_id string, started_at timestamp, finished_at timestamp, inputs array<string>, "
            "files long, lines_read long, rows_new long, rows_existing long, rows_quarantined long, "
            "quarantined_by_reason map<string,long>, bronze_version long, settings string, "
            "skipped_files array<struct<path:string,reason:string>>")


def check_input_reachable(cfg: Config, master: str) -> None:
    """The executors read the input files (the driver only lists and cuts them): on a master that
    is not ``local[...]`` a plain local ``ingest.input`` must lie on a mount declared in
    ``tables.shared_mounts``, else it is refused naming the key (each executor would read its own
    disk: files missing there, or other files of the same name)."""
    if cfg.ingest.input:
        check_reachable(cfg.ingest.input, master, what="ingest.input", shared_mounts=cfg.tables.shared_mounts)


def run(cfg: Config, spark) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    check_input_reachable(cfg, master_of(spark))
    store = DeltaStore(spark, cfg.tables)
    t = cfg.tables
    started = datetime.now(timezone.utc)
    parsed, inputs = parse_inputs(spark, cfg.ingest)
    # The parsed lines are read several times (accounting, keys, bronze, quarantine): parse once.
    # Path-based tables: a Parquet staging copy, whose narrow columns later reads scan cheaply;
    # catalog tables (no shared path known): Spark's cache.
    staging = _staging_path(cfg, store)
    if staging:
        check_within(staging, staging.rsplit("/", 1)[0], "ingest's staging directory")
        parsed.write.mode("overwrite").parquet(staging)
        parsed = spark.read.parquet(staging)
    else:
        parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        by_reason = {r["reason"]: int(r["count"]) for r in parsed.groupBy("reason").count().collect()}
        lines_read = sum(by_reason.values())
        by_reason.pop(None, 0)
        quarantined = sum(by_reason.values())
        stamp = F.lit(started).cast("timestamp")

        # One row per record_id: its first occurrence in input order (file, then line), unless
        # bronze holds it already. Worked out on (record_id, pos) keys only; the full rows are
        # then filtered by an anti-join on the (usually few) rejected keys, broadcast when small.
        good = parsed.filter(F.col("reason").isNull())
        bronze_version = store.version(t.bronze)
        held = store.read(t.bronze, bronze_version).select("record_id") if bronze_version is not None else None
        rejected = rejected_keys(good.select("record_id", "pos"), held).persist(StorageLevel.MEMORY_AND_DISK)
        existing = {r["why"]: int(r["count"]) for r in rejected.groupBy("why").count().collect()}
        n_rejected = sum(existing.values())
        rejected = rejected.select("record_id", "pos")
        if n_rejected == 0:
            new = good
        elif n_rejected <= BROADCAST_KEYS:
            new = good.join(F.broadcast(rejected), ["record_id", "pos"], "left_anti")
        else:
            new = good.join(rejected, ["record_id", "pos"], "left_anti")
        new = new.withColumn("ingested_at", stamp).withColumn("run_id", F.lit(cfg.run_id)).select(*BRONZE_COLUMNS)
        # Insert-only merge on record_id: appended as written when bronze is still at the version
        # the anti-join read (nothing new: no commit), merged when another run committed meanwhile.
        if lines_read == quarantined:   # no valid line: bronze is not touched (nor created empty)
            commit = None
            rows_new = 0
        else:
            commit = store.merge(new, t.bronze, keys=["record_id"], update=False, absent_at=bronze_version,
                                 job="ingest", run_id=cfg.run_id)
            rows_new = commit.inserted
        if commit is not None and commit.committed and commit.read_version != bronze_version:
            # Another run committed in between: count the rows it had inserted first, against the
            # bronze version our merge read.
            seen = store.read(t.bronze, commit.read_version).select("record_id") \
                if commit.read_version is not None else None
            existing["inserted_concurrently"] = 0 if seen is None else \
                new.select("record_id").join(seen, "record_id", "left_semi").count()
        rejected.unpersist()
        rows_existing = sum(existing.values())
        committed = commit is not None and commit.committed
        bronze_version = commit.version if committed else store.version(t.bronze)

        if quarantined or not store.exists(t.quarantine):
            bad = (parsed.filter(F.col("reason").isNotNull()).withColumn("ingested_at", stamp)
                   .withColumn("run_id", F.lit(cfg.run_id)).select(*QUARANTINE_COLUMNS))
            q_version = store.version(t.quarantine)
            if q_version is not None:  # the same bad line ingested again is not recorded twice
                bad = bad.join(store.read(t.quarantine, q_version).select(*QUARANTINE_KEYS), QUARANTINE_KEYS,
                               "left_anti")
            store.merge(bad, t.quarantine, keys=QUARANTINE_KEYS, update=False, absent_at=q_version,
                        job="ingest", run_id=cfg.run_id)
    finally:
        parsed.unpersist()
        if staging:
            remove_dir(staging, under=staging.rsplit("/", 1)[0])

    expect_equal(f"ingest {cfg.run_id} accounting",
                 ("lines read", lines_read),
                 (f"rows new ({rows_new}, bronze's commit) + rows existing ({rows_existing}: "
                  f"{', '.join(f'{k} {v}' for k, v in sorted(existing.items())) or 'none'}) + rows "
                  f"quarantined ({quarantined})", rows_new + rows_existing + quarantined))
    skipped = [{"path": p, "reason": r} for p, r in inputs.skipped]
    summary = {
        "job": "ingest", "run_id": cfg.run_id, "inputs": [f.uri for f in inputs.files],
        "files": len(inputs.files), "skipped_files": skipped, "lines_read": lines_read, "rows_new": rows_new,
        "rows_existing": rows_existing, "rows_existing_by_kind": dict(sorted(existing.items())),
        "rows_quarantined": quarantined, "quarantined_by_reason": dict(sorted(by_reason.items())),
        "bronze": store.location(t.bronze), "bronze_version": bronze_version,
        "bronze_committed": committed,
        "quarantine": store.location(t.quarantine), "backend": store.backend,
        "backend_reason": store.backend_reason,
    }
    row = (cfg.run_id, started, datetime.now(timezone.utc), summary["inputs"], len(inputs.files), lines_read,
           rows_new, rows_existing, quarantined, summary["quarantined_by_reason"], bronze_version,
           json.dumps(cfg.to_dict()["ingest"], sort_keys=True), [(s["path"], s["reason"]) for s in skipped])
    store.append_rows([row], RUNS_DDL, t.ingest_runs, job="ingest", run_id=cfg.run_id, evolve_schema=True)
    summary["ingest_runs"] = store.location(t.ingest_runs)
    problem = no_record_problem(summary)
    if problem:   # after the quarantine rows and the run's row are committed: nothing is lost
        raise NoRecordsError(problem, summary)
    return summary


class NoRecordsError(RuntimeError):
    """The input gave no valid record: it was empty, or every line was quarantined. Raised
    after the quarantine rows and the ``ingest_runs`` row are committed; ``summary`` is the run's."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def _names(uris: list[str], most: int = 5) -> str:
    shown = ", ".join(redact_uri(u) for u in uris[:most])
    return shown + (f" and {len(uris) - most} more" if len(uris) > most else "")


def no_record_problem(summary: dict) -> str | None:
    """Why a run's input gave no record (an error message), or None when it gave one. Valid
    lines already in bronze are records (a re-run of the same files is no error)."""
    files = summary["inputs"]
    runs, quarantine = redact_uri(summary["ingest_runs"]), redact_uri(summary["quarantine"])
    where = f"{len(files)} file{'s' if len(files) != 1 else ''}: {_names(files)}"
    if summary["lines_read"] == 0:
        return (f"ingest {summary['run_id']}: the input holds no line to read (empty file"
                f"{'s' if len(files) != 1 else ''}?) in {where}; nothing was written to bronze "
                f"(run recorded in {runs})")
    if summary["rows_quarantined"] == summary["lines_read"]:
        reasons = sorted(summary["quarantined_by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))
        top = ", ".join(f"{r} {n}" for r, n in reasons[:5]) + (", ..." if len(reasons) > 5 else "")
        return (f"ingest {summary['run_id']}: no valid record: all {summary['lines_read']} lines of {where} were "
                f"quarantined (top reasons: {top}); see {quarantine} where run_id = "
                f"'{summary['run_id']}' (run recorded in {runs})")
    return None


def _staging_path(cfg: Config, store) -> str | None:
    ref = store.ref(cfg.tables.bronze)
    if ref.path is None:
        return None
    return f"{ref.path.rsplit('/', 1)[0]}/_staging/{cfg.run_id}"
