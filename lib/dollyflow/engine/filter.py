"""The filter job's Spark side: per-category length statistics (two small aggregations), the
decisions (one ``mapInPandas`` pass over silver, the benchmark n-gram index broadcast once and
every record checked in the executors), and the counts for the run row.

Each Python worker builds its :class:`~dollyflow.core.filtering.RecordFilter` once (presidio,
lingua and the rules; a few seconds, mostly presidio's import) and keeps it for every later
batch and task of the same settings.
"""
from __future__ import annotations

import json
from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from dollyflow.core.filtering import BenchmarkIndex, FilterSettings, RecordFilter, length_stats

#: columns the decisions add to silver's: the curated ones, then the job's own
CURATED_EXTRA = ("redactions", "filter_run_id")
DECISION_EXTRA = ("stage", "reason", "detail", "span", "language", "redacted_kinds")
FILTERED_DDL = ("record_id string, stage string, reason string, detail string, span string, "
                "filter_run_id string, silver_version long")
#: the words of a response, as :func:`dollyflow.core.filtering.quality.words_of` counts them (Java regex)
WORD_REGEX = r"(?U)\w+(?:['’]\w+)*"

_CACHE: dict = {}


def length_statistics(silver: DataFrame, min_records: int) -> dict:
    """category -> (median, robust deviation) of the responses' log word counts: records, median
    (``percentile_approx``) per category, then the median absolute deviation from it; a handful of
    rows come back to the driver."""
    n = F.regexp_count(F.coalesce(F.col("response"), F.lit("")), F.lit(WORD_REGEX))
    logs = (silver.select("category", n.alias("n"))
            .where(F.col("n") > 0).select("category", F.log(F.col("n").cast("double")).alias("x")))
    med = logs.groupBy("category").agg(F.count(F.lit(1)).alias("records"),
                                       F.percentile_approx("x", 0.5, 10000).alias("median"))
    mad = (logs.join(med, "category").groupBy("category", "records", "median")
           .agg(F.percentile_approx(F.abs(F.col("x") - F.col("median")), 0.5, 10000).alias("mad")))
    rows = mad.collect()
    return length_stats({r["category"]: (int(r["records"]), r["median"], r["mad"]) for r in rows}, min_records)


class Decider:
    """``mapInPandas`` function: silver batches -> silver's columns (text redacted) + the decision."""

    def __init__(self, settings: FilterSettings, index_bc, stats: dict, run_id: str):
        self.settings_json = settings.to_json()
        self.settings = settings
        self.index_bc = index_bc
        self.stats = stats
        self.run_id = run_id

    def record_filter(self) -> RecordFilter:
        key = (self.settings_json, json.dumps(self.stats, sort_keys=True), id(self.index_bc))
        rf = _CACHE.get(key)
        if rf is None:
            _CACHE.clear()
            index = self.index_bc.value if self.index_bc is not None else None
            rf = _CACHE[key] = RecordFilter(self.settings, index, self.stats)
        return rf

    def __call__(self, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        rf = None
        for pdf in batches:
            rf = rf or self.record_filter()
            out = {k: [] for k in ("instruction", "context", "response", *CURATED_EXTRA[:1], *DECISION_EXTRA)}
            for ins, ctx, res, cat in zip(pdf["instruction"], pdf["context"], pdf["response"], pdf["category"]):
                d = rf.decide(ins, None if ctx is None or (isinstance(ctx, float)) else ctx, res, cat)
                for k in out:
                    out[k].append(getattr(d, k))
            for k, v in out.items():
                pdf[k] = pd.Series(v, index=pdf.index, dtype=object)
            pdf["filter_run_id"] = self.run_id
            yield pdf


def decisions(silver: DataFrame, settings: FilterSettings, index: BenchmarkIndex | None, stats: dict,
              run_id: str) -> DataFrame:
    """silver's columns (instruction, context, response redacted where kept) + ``redactions``,
    ``filter_run_id`` + the decision columns; one row per silver row."""
    spark = silver.sparkSession
    index_bc = spark.sparkContext.broadcast(index) if index is not None and index.hashes.size else None
    schema = StructType([*silver.schema.fields,
                         *[StructField(c, StringType(), True) for c in (*CURATED_EXTRA, *DECISION_EXTRA)]])
    return silver.mapInPandas(Decider(settings, index_bc, stats, run_id), schema)


def curated_of(decided: DataFrame, silver_columns: list[str]) -> DataFrame:
    return decided.where(F.col("stage").isNull()).select(*silver_columns, *CURATED_EXTRA)


def filtered_of(decided: DataFrame, silver_version: int) -> DataFrame:
    return (decided.where(F.col("stage").isNotNull())
            .select("record_id", "stage", "reason", "detail", "span", "filter_run_id",
                    F.lit(int(silver_version)).cast("long").alias("silver_version")))


def summarize(decided: DataFrame) -> dict:
    """Counts for the run row (a few rows come back): removed per stage and reason, redactions per
    kind, records per detected language, undetermined languages among the records that reached
    that stage."""
    by = decided.groupBy("stage", "reason").agg(F.count(F.lit(1)).alias("n")).collect()
    removed: dict = {}
    rows = kept = 0
    for r in by:
        rows += int(r["n"])
        if r["stage"] is None:
            kept += int(r["n"])
        else:
            removed.setdefault(r["stage"], {})[r["reason"]] = int(r["n"])
    kinds = (decided.where(F.col("stage").isNull() & F.col("redacted_kinds").isNotNull())
             .select(F.explode(F.split("redacted_kinds", ",")).alias("kind"))
             .groupBy("kind").agg(F.count(F.lit(1)).alias("n")).collect())
    langs = (decided.where(F.col("stage").isNull() | (F.col("stage") != "pii"))
             .groupBy("language").agg(F.count(F.lit(1)).alias("n")).collect())
    records_redacted = decided.where(F.col("stage").isNull() & F.col("redactions").isNotNull()).count()
    return {"rows_in": rows, "rows_kept": kept, "rows_removed": rows - kept,
            "removed": {s: dict(sorted(v.items())) for s, v in sorted(removed.items())},
            "redactions": {r["kind"]: int(r["n"]) for r in sorted(kinds, key=lambda r: r["kind"])},
            "records_redacted": int(records_redacted),
            "languages": {(r["language"] or "undetermined"): int(r["n"])
                          for r in sorted(langs, key=lambda r: r["language"] or "")}}
