"""filter: silver (at a recorded version) -> curated, filtered, and one row in filter_runs.

Four stages, in order; the first that removes a record names it (:mod:`dollyflow.core.filtering`):

- ``pii``: emails, phone numbers, credit-card numbers (Luhn-checked), IP addresses and IBANs in
  instruction, context and response (presidio's pattern recognizers, no model); per kind
  ``filter.pii.<kind>``: ``redact`` (typed placeholder such as ``<EMAIL>``, recorded in
  ``curated.redactions``), ``drop`` (reason ``pii_<kind>``) or ``off``;
- ``language``: lingua on instruction + response; a language outside ``filter.languages`` is
  removed (``language_<code>``), a text too short to tell is kept and counted as undetermined;
- ``quality``: ``empty_response``, ``repeats_instruction``, ``repeats_context``, ``repetition``
  (Gopher), ``non_alpha``, ``length_outlier`` (against the category's length distribution);
- ``decontaminate``: a word n-gram (``filter.ngram``, 13) shared with an item of a benchmark file
  of ``filter.decontaminate`` (``benchmark_overlap``, the item named in ``detail``).

Tables:

- curated: silver's columns (text after redaction), ``redactions`` (JSON list of {field, kind,
  start, end, placeholder}, start/end in the original text; null when none) and ``filter_run_id``;
- filtered: record_id, stage, reason, detail, span (the offending text, where there is one),
  filter_run_id, silver_version;
- filter_runs: run_id, silver_version, settings (JSON: the fingerprint, benchmark files' sha256
  included), removed (JSON: stage -> reason -> records), redactions (JSON: kind -> spans),
  languages (JSON), rows_in / rows_kept / rows_removed, the versions written, times.

Bad input fails before silver is read, naming the key: an unknown language code, a missing or
unreadable benchmark file, a threshold out of range (:mod:`dollyflow.config.validation`).
Counts are checked before anything is committed: silver's rows at the version read (its Delta log)
= rows decided = staged curated + staged filtered; then each commit's rows. Idempotent: with
``filter.skip_unchanged`` a run on the same silver version and settings, while curated and filtered
are still at the versions the last run wrote, writes nothing and reports ``skipped: true``.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone

from pyspark import StorageLevel

from dollyflow.config import Config
from dollyflow.core.counts import expect_equal
from dollyflow.core.filtering import FilterSettings, build_index
from dollyflow.engine.delta import DeltaStore
from dollyflow.engine.filter import curated_of, decisions, filtered_of, length_statistics, summarize

RUNS_DDL = ("run_id string, started_at timestamp, finished_at timestamp, silver_version long, settings string, "
            "settings_sha256 string, rows_in long, rows_kept long, rows_removed long, removed string, "
            "redactions string, records_redacted long, languages string, curated_version long, "
            "filtered_version long, seconds double")


def unchanged(store, cfg: Config, silver_version: int, settings_json: str):
    """The last run's row when re-running would reproduce exactly what the tables hold."""
    t = cfg.tables
    prev = store.newest_row(t.filter_runs)
    if prev is None or prev["silver_version"] != silver_version or prev["settings"] != settings_json:
        return None
    if store.version(t.curated) != prev["curated_version"] or store.version(t.filtered) != prev["filtered_version"]:
        return None
    return prev


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run(cfg: Config, spark) -> dict:
    store = DeltaStore(spark, cfg.tables)
    t, f = cfg.tables, cfg.filter
    started = datetime.now(timezone.utc)
    t0 = time.time()
    # bad input fails here, before silver is read: language codes, benchmark files
    index = build_index(list(f.decontaminate), list(f.decontaminate_fields), int(f.ngram)) if f.decontaminate else None
    settings = FilterSettings.from_config(f, index.files if index is not None else None)
    settings_json = settings.to_json()
    silver_version = f.silver_version if f.silver_version is not None else store.version(t.silver)
    if silver_version is None:
        raise RuntimeError(f"silver table {store.location(t.silver)} does not exist: run dedupe first")
    silver_version = int(silver_version)
    base = {"job": "filter", "run_id": cfg.run_id, "silver": store.location(t.silver),
            "silver_version": silver_version, "settings_sha256": _sha(settings_json),
            "curated": store.location(t.curated), "filtered": store.location(t.filtered),
            "filter_runs": store.location(t.filter_runs), "backend": store.backend,
            "benchmark_files": [dict(x) for x in settings.decontaminate],
            "benchmark_ngrams": int(index.hashes.size) if index is not None else 0}
    if f.skip_unchanged:
        prev = unchanged(store, cfg, silver_version, settings_json)
        if prev is not None:
            return {**base, "skipped": True, "previous_run_id": prev["run_id"],
                    **{k: prev[k] for k in ("rows_in", "rows_kept", "rows_removed", "records_redacted",
                                            "curated_version", "filtered_version")},
                    **{k: json.loads(prev[k]) for k in ("removed", "redactions", "languages")}}

    timings: dict = {}
    silver = store.read(t.silver, silver_version)
    silver_columns = list(silver.columns)
    t1 = time.time()
    stats = length_statistics(silver, int(f.length_min_records))
    timings["length_stats"] = round(time.time() - t1, 2)
    t1 = time.time()
    decided = decisions(silver, settings, index, stats, cfg.run_id).persist(StorageLevel.DISK_ONLY)
    staged = []
    try:
        counts = summarize(decided)
        timings["decide"] = round(time.time() - t1, 2)
        t1 = time.time()
        staged.append(store.stage(filtered_of(decided, silver_version), t.filtered))
        staged.append(store.stage(curated_of(decided, silver_columns), t.curated))
        (filt_sink, filt_parts), (cur_sink, cur_parts) = staged
        filt_rows, cur_rows = sum(p[2] for p in filt_parts), sum(p[2] for p in cur_parts)
        timings["stage"] = round(time.time() - t1, 2)
        # silver rows (its Delta log) = rows decided = staged curated + staged filtered
        silver_rows = expect_equal(f"filter: silver v{silver_version}",
                                   (f"rows of {store.location(t.silver)} v{silver_version}",
                                    store.count(t.silver, silver_version)),
                                   ("rows decided by filter", counts["rows_in"]))
        expect_equal("filter: outputs", ("silver rows", silver_rows),
                     (f"rows of curated ({cur_rows}) + filtered ({filt_rows}) as written, before their commits",
                      cur_rows + filt_rows))
        expect_equal("filter: filtered", ("records removed", counts["rows_removed"]),
                     ("rows of filtered as written", filt_rows))
        t1 = time.time()
        filtered_version = store.commit_parts(filt_sink, filt_parts, t.filtered, mode="overwrite", job="filter",
                                              run_id=cfg.run_id)
        staged.pop(0)
        curated_version = store.commit_parts(cur_sink, cur_parts, t.curated, mode="overwrite", job="filter",
                                             run_id=cfg.run_id)
        staged.pop(0)
        timings["write"] = round(time.time() - t1, 2)
    finally:
        for sink, _ in staged:      # written, never committed: removed
            store.discard_parts(sink)
        decided.unpersist()
    expect_equal("filter: commits", ("rows checked (curated + filtered)", cur_rows + filt_rows),
                 (f"rows of curated v{curated_version.version} ({curated_version.rows}) + filtered "
                  f"v{filtered_version.version} ({filtered_version.rows}) (their commits)",
                  curated_version.rows + filtered_version.rows))
    seconds = round(time.time() - t0, 2)
    row = (cfg.run_id, started, datetime.now(timezone.utc), silver_version, settings_json, _sha(settings_json),
           counts["rows_in"], counts["rows_kept"], counts["rows_removed"], json.dumps(counts["removed"]),
           json.dumps(counts["redactions"]), counts["records_redacted"], json.dumps(counts["languages"]),
           int(curated_version), int(filtered_version), float(seconds))
    store.append_rows([row], RUNS_DDL, t.filter_runs, job="filter", run_id=cfg.run_id)
    return {**base, "skipped": False, **counts, "curated_version": int(curated_version),
            "filtered_version": int(filtered_version), "length_stats": {k: [round(v[0], 4), round(v[1], 4)]
                                                                         for k, v in stats.items()},
            "step_seconds": timings, "job_seconds": seconds}
