"""Spark glue of the evaluate job: which predictions are compared, their rows joined with
silver's references, and the per-record scoring on the workers. Spark only moves rows; every
metric is :func:`dollyflow.core.evaluation.metrics.score_many`, called by a ``mapInPandas``
function on each batch of rows (the ROUGE tokenizer and sacrebleu's metric objects are built
once per Python worker and kept).

- :func:`find_sides`: the (model_sha, params_sha) pairs of ``predictions`` that
  ``evaluate.models`` and ``evaluate.params_sha`` select (default: the newest infer run's), in
  order, each a :class:`Side` labelled A, B, C ...; a selector that matches nothing is an error
  naming it.
- :func:`compared_rows`: the selected predictions of the records predicted by *every* side and
  present in silver at the version read, with the reference ``response`` and ``category``, and
  the counts of what was left out.
- :func:`score_rows`: the metric columns added (``mapInPandas``).
"""
from __future__ import annotations

import os
import string
from dataclasses import asdict, dataclass
from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from dollyflow.core.evaluation.metrics import METRICS, score_many
from dollyflow.core.models.files import model_digest

#: What a stored eval_records row is identified by (besides the prediction it scored).
RECORD_KEYS = ["record_id", "model_sha", "params_sha", "silver_version"]
#: The columns the scored rows carry through from the compared rows.
PASS_THROUGH = ["record_id", "category", "model", "model_sha", "params_sha", "silver_version", "finish_reason",
                "prediction_sha"]
SCORED_DDL = ("record_id string, category string, model string, model_sha string, params_sha string, "
              "silver_version long, finish_reason string, prediction_sha string, "
              + ", ".join(f"{m} double" for m in METRICS) + ", reason string")
#: The scored rows' columns, in order.
SCORED_COLUMNS = [*PASS_THROUGH, *METRICS, "reason"]
MIN_SHA_PREFIX = 8


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a model and a parameter set in ``predictions``."""
    label: str
    model: str            # the predictions' model column (the source as infer was given it)
    model_sha: str
    params_sha: str
    params: str           # the generation parameters as JSON
    rows: int             # its rows in predictions
    selector: str         # the evaluate.models entry that chose it ("" for the newest run)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_hex(s: str) -> bool:
    return bool(s) and all(c in string.hexdigits for c in s)


def _digest_of_dir(entry: str) -> str | None:
    if not os.path.isdir(entry):
        return None
    try:
        return model_digest(entry)
    except (OSError, ValueError):
        return None


def _matches(entry: str, group: dict, digest: str | None) -> bool:
    low = entry.strip().lower()
    if digest is not None and group["model_sha"] == digest:
        return True
    if _is_hex(low) and len(low) >= MIN_SHA_PREFIX and group["model_sha"].startswith(low):
        return True
    return entry in (group["model"],) or entry in group["run_ids"]


def find_sides(store, predictions: str, models: list[str], params_sha: list[str]) -> list[Side]:
    """The sides ``models`` and ``params_sha`` select in ``predictions`` (see the module
    docstring); errors name the selector that matched nothing."""
    if not store.exists(predictions):
        raise RuntimeError(f"the predictions table {store.location(predictions)} does not exist: run infer first")
    df = store.read(predictions)
    missing = [c for c in ("record_id", "model", "model_sha", "params_sha", "response", "finish_reason")
               if c not in df.columns]
    if missing:
        raise RuntimeError(f"{store.location(predictions)} lacks the column(s) {missing}: evaluate compares "
                           "predictions by record_id (infer.key_columns=[record_id])")
    groups = [r.asDict() for r in df.groupBy("model_sha", "params_sha").agg(
        F.first("model").alias("model"), F.first("params").alias("params"),
        F.collect_set("run_id").alias("run_ids"), F.min("created_at").alias("first_at"),
        F.max("created_at").alias("last_at"), F.count(F.lit(1)).alias("rows")).collect()]
    where = store.location(predictions)
    if not groups:
        raise RuntimeError(f"{where} has no predictions: run infer first")
    wanted = set(params_sha)
    chosen: list[tuple[dict, str]] = []
    if not models:
        newest = max(groups, key=lambda g: (g["last_at"] is not None, g["last_at"]))
        latest = df.where((F.col("model_sha") == newest["model_sha"]) & (F.col("params_sha") == newest["params_sha"])) \
            .orderBy(F.col("created_at").desc()).select("run_id").first()["run_id"]
        picked = [g for g in groups if latest in g["run_ids"]
                  and (not wanted or g["params_sha"] in wanted)]
        if not picked:
            raise RuntimeError(f"the newest infer run {latest!r} has no predictions with params_sha in "
                               f"{sorted(wanted)}; name the models to compare in evaluate.models")
        chosen = [(g, "") for g in sorted(picked, key=lambda g: g["first_at"])]
    else:
        for entry in models:
            digest = _digest_of_dir(entry)
            hits = [g for g in groups if _matches(entry, g, digest)]
            if not hits:
                known = ", ".join(sorted({f"{g['model']} ({g['model_sha'][:12]})" for g in groups}))
                raise RuntimeError(f"no predictions for the model {entry!r} in {where}"
                                   + (f" (its weights hash to {digest[:12]})" if digest else "")
                                   + f": run infer with it first. Models there: {known}")
            kept = [g for g in hits if not wanted or g["params_sha"] in wanted]
            if not kept:
                have = ", ".join(sorted(g["params_sha"] for g in hits))
                raise RuntimeError(f"no predictions for the model {entry!r} with evaluate.params_sha in "
                                   f"{sorted(wanted)} in {where}; its parameter sets there: {have}")
            for g in sorted(kept, key=lambda g: g["first_at"]):
                if all((g["model_sha"], g["params_sha"]) != (c["model_sha"], c["params_sha"]) for c, _ in chosen):
                    chosen.append((g, entry))
    return [Side(label=_label(i), model=g["model"], model_sha=g["model_sha"], params_sha=g["params_sha"],
                 params=g["params"] or "", rows=int(g["rows"]), selector=sel) for i, (g, sel) in enumerate(chosen)]


def _label(i: int) -> str:
    letters = string.ascii_uppercase
    return letters[i] if i < len(letters) else f"S{i + 1}"


def _side_filter(sides: list[Side]):
    cond = F.lit(False)
    for s in sides:
        cond = cond | ((F.col("model_sha") == s.model_sha) & (F.col("params_sha") == s.params_sha))
    return cond


def compared_rows(store, predictions: str, silver: str, silver_version: int, sides: list[Side]) -> tuple[DataFrame, dict]:
    """The rows to score and the counts of the records left out: ``records`` (distinct
    record_ids among the sides' predictions), ``compared`` (predicted by every side and in
    silver), ``not_in_every_model``, ``not_in_silver``."""
    preds = (store.read(predictions).where(_side_filter(sides))
             .select("record_id", "model", "model_sha", "params_sha", F.col("response").alias("prediction"),
                     "finish_reason")
             .where(F.col("record_id").isNotNull())
             .dropDuplicates(["record_id", "model_sha", "params_sha"]))
    ref = (store.read(silver, silver_version)
           .select("record_id", F.col("response").alias("reference"), "category")
           .dropDuplicates(["record_id"]))
    per_id = (preds.groupBy("record_id").agg(F.count(F.lit(1)).alias("k"))
              .join(ref.select("record_id", F.lit(True).alias("in_silver")), "record_id", "left"))
    full = F.col("k") == len(sides)
    c = per_id.agg(F.count(F.lit(1)).alias("records"),
                   F.sum(F.when(full & F.col("in_silver").isNotNull(), 1).otherwise(0)).alias("compared"),
                   F.sum(F.when(~full, 1).otherwise(0)).alias("partial"),
                   F.sum(F.when(F.col("in_silver").isNull(), 1).otherwise(0)).alias("absent")).first()
    counts = {"records": int(c["records"]), "compared": int(c["compared"] or 0),
              "not_in_every_model": int(c["partial"] or 0), "not_in_silver": int(c["absent"] or 0)}
    ids = per_id.where(full & F.col("in_silver").isNotNull()).select("record_id")
    rows = (preds.join(ids, "record_id", "left_semi").join(ref, "record_id", "inner")
            .withColumn("silver_version", F.lit(int(silver_version)).cast("long"))
            .withColumn("prediction_sha", F.sha2(F.concat_ws("\u0001", F.coalesce(F.col("prediction"), F.lit("\u0000")),
                                                             F.coalesce(F.col("finish_reason"), F.lit(""))), 256)))
    return rows, counts


def _strings(col: pd.Series) -> list:
    return [v if isinstance(v, str) else None for v in col]


def score_frames(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` function: each batch's rows with their metrics (:data:`SCORED_DDL`)."""
    for pdf in frames:
        if len(pdf) == 0:
            continue
        scored = score_many(_strings(pdf["prediction"]), _strings(pdf["reference"]))
        out = pdf[PASS_THROUGH].copy()
        for m in METRICS:
            out[m] = pd.array([float("nan") if v is None else v for v in scored[m]], dtype="float64")
        out["reason"] = pd.array(scored["reason"], dtype=object)
        yield out


def score_rows(rows: DataFrame, partitions: int) -> DataFrame:
    """``rows`` (:func:`compared_rows`) scored on the workers, spread over ``partitions`` tasks."""
    return rows.select(*PASS_THROUGH, "prediction", "reference").repartition(partitions) \
        .mapInPandas(score_frames, SCORED_DDL)
