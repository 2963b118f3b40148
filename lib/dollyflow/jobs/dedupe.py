"""dedupe: bronze (at a recorded version) -> silver, duplicates, and one row in dedupe_runs.

- silver: one survivor per duplicate cluster, all bronze columns.
- duplicates: every removed record: record_id, cluster_id, survivor_id, kind (exact | near),
  similarity (1.0 for exact; for near, the estimated Jaccard to the survivor of the less similar
  part: min(instruction+response, context), a context counting 1.0 when neither has one).
- dedupe_runs: run_id, times, bronze_version, input_rows, survivors, removed_exact,
  removed_near, clusters (clusters with at least one removed record), verified_pairs,
  parameters (JSON), silver_version, duplicates_version (the versions of this run's own commits).

Counts are checked, not assumed, and before anything is committed: both outputs are first
written without a commit (:meth:`~dollyflow.engine.delta.DeltaStore.stage`) and their rows
counted from the files; bronze's rows at the version read (from its Delta log) must equal the
rows dedupe read and the staged silver plus duplicates rows (and duplicates the records removed),
otherwise the run fails naming the numbers, its staged files are removed, and silver and
duplicates stay at their previous versions. Then duplicates and silver are committed, and each
commit's rows must equal what was checked.

Exact duplicates: equal after normalisation (NFC, case-fold, whitespace collapsed and trimmed) of
instruction, context and response. Near duplicates: the instruction+response part and the
context are compared separately, and both must reach the Jaccard threshold (or neither record
has a context), so a shared passage alone never makes a duplicate; MinHash/LSH over word n-grams
of the instruction+response part finds candidates, both parts are verified, and connected
components cluster them (see :mod:`dollyflow.engine.dedupe`). Survivor: earliest ``ingested_at``, then smallest ``record_id``;
``cluster_id`` is the survivor's ``record_id``.

Idempotent: when ``dedupe.skip_unchanged`` is on (default) and the last dedupe run used the same
bronze version and parameters and silver/duplicates are still at the versions it wrote, the job
writes nothing (no new table versions) and reports ``skipped: true``. Otherwise silver and
duplicates are overwritten (same content for the same input) and a run row is appended.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

from dollyflow.config import Config
from dollyflow.core.counts import expect_equal
from dollyflow.engine.dedupe import DedupeParams, find_duplicates, silver_of, summarize
from dollyflow.engine.delta import DeltaStore

RUNS_DDL = ("run_id string, started_at timestamp, finished_at timestamp, bronze_version long, "
            "input_rows long, survivors long, removed_exact long, removed_near long, clusters long, "
            "verified_pairs long, parameters string, silver_version long, duplicates_version long, "
            "seconds double")


def unchanged(store, cfg: Config, bronze_version: int, params_json: str):
    """The last run's row when re-running would reproduce exactly what the tables hold."""
    t = cfg.tables
    prev = store.newest_row(t.dedupe_runs)
    if prev is None or prev["bronze_version"] != bronze_version or prev["parameters"] != params_json:
        return None
    if store.version(t.silver) != prev["silver_version"] or store.version(t.duplicates) != prev["duplicates_version"]:
        return None
    return prev


def run(cfg: Config, spark) -> dict:
    store = DeltaStore(spark, cfg.tables)
    t = cfg.tables
    d = cfg.dedupe
    started = datetime.now(timezone.utc)
    t0 = time.time()
    params = DedupeParams.from_config(d)
    bronze_version = d.bronze_version if d.bronze_version is not None else store.version(t.bronze)
    if bronze_version is None:
        raise RuntimeError(f"bronze table {store.location(t.bronze)} does not exist: run ingest first")
    base = {"job": "dedupe", "run_id": cfg.run_id, "bronze": store.location(t.bronze),
            "bronze_version": int(bronze_version), "parameters": params.to_json(),
            "silver": store.location(t.silver), "duplicates": store.location(t.duplicates),
            "dedupe_runs": store.location(t.dedupe_runs), "backend": store.backend,
            "backend_reason": store.backend_reason}

    if d.skip_unchanged:
        prev = unchanged(store, cfg, int(bronze_version), params.to_json())
        if prev is not None:
            keys = ("input_rows", "survivors", "removed_exact", "removed_near", "clusters",
                    "verified_pairs", "silver_version", "duplicates_version")
            return {**base, "skipped": True, "previous_run_id": prev["run_id"],
                    **{k: prev[k] for k in keys}}

    bronze = store.read(t.bronze, int(bronze_version))
    timings: dict = {}
    frames = find_duplicates(bronze, params, d.max_cc_iterations, timings)
    staged = []
    try:
        t1 = time.time()
        counts = summarize(frames.duplicates, frames.input_rows)
        verified_pairs = frames.verified_pairs.count()
        # Both outputs are written but not committed, their rows counted from the files, and
        # checked; only then committed. A failed check leaves silver and duplicates as they were.
        staged.append(store.stage(frames.duplicates, t.duplicates))
        staged.append(store.stage(silver_of(bronze, frames.duplicates), t.silver))
        (dup_sink, dup_parts), (silver_sink, silver_parts) = staged
        dup_rows, silver_rows = sum(p[2] for p in dup_parts), sum(p[2] for p in silver_parts)
        timings["stage"] = round(time.time() - t1, 2)
        # bronze rows (its Delta log) = rows dedupe read = staged silver + staged duplicates
        bronze_rows = expect_equal(f"dedupe: bronze v{bronze_version}",
                                   (f"rows of {store.location(t.bronze)} v{bronze_version}",
                                    store.count(t.bronze, int(bronze_version))),
                                   ("rows read by dedupe", counts["input_rows"]))
        expect_equal("dedupe: outputs", ("bronze rows", bronze_rows),
                     (f"rows of silver ({silver_rows}) + duplicates ({dup_rows}) as written, before their commits",
                      silver_rows + dup_rows))
        expect_equal("dedupe: duplicates", ("records removed (exact + near)",
                                            counts["removed_exact"] + counts["removed_near"]),
                     ("rows of duplicates as written", dup_rows))
        t1 = time.time()
        duplicates_version = store.commit_parts(dup_sink, dup_parts, t.duplicates, mode="overwrite", job="dedupe",
                                                run_id=cfg.run_id)
        staged.pop(0)
        silver_version = store.commit_parts(silver_sink, silver_parts, t.silver, mode="overwrite", job="dedupe",
                                            run_id=cfg.run_id)
        staged.pop(0)
        timings["write"] = round(time.time() - t1, 2)
    finally:
        for sink, _ in staged:      # written, never committed: removed
            store.discard_parts(sink)
        frames.signed.unpersist()
    # each commit holds exactly the rows checked
    expect_equal("dedupe: commits", ("rows checked (silver + duplicates)", silver_rows + dup_rows),
                 (f"rows of silver v{silver_version.version} ({silver_version.rows}) + duplicates "
                  f"v{duplicates_version.version} ({duplicates_version.rows}) (their commits)",
                  silver_version.rows + duplicates_version.rows))
    seconds = round(time.time() - t0, 2)
    row = (cfg.run_id, started, datetime.now(timezone.utc), int(bronze_version), counts["input_rows"],
           counts["survivors"], counts["removed_exact"], counts["removed_near"], counts["clusters"],
           int(verified_pairs), params.to_json(), int(silver_version), int(duplicates_version), float(seconds))
    store.append_rows([row], RUNS_DDL, t.dedupe_runs, job="dedupe", run_id=cfg.run_id)
    return {**base, "skipped": False, **counts, "verified_pairs": int(verified_pairs),
            "silver_version": int(silver_version), "duplicates_version": int(duplicates_version),
            "step_seconds": timings}
