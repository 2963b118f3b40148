"""The run report's evaluation part: the ``eval_runs`` row the run's evaluate job wrote, read at
the version the run recorded, and the best and worst examples per category from ``eval_records``,
``predictions`` and ``silver`` at the versions that row records (Delta time travel), so
``dollyflow report --run-id`` shows what that evaluation saw whatever happened since.

Only the row's JSON and :data:`EXAMPLES_PER_KIND` best plus as many worst records per category
come to the driver (one when the category's best and worst score the same: ``kind`` "all
equal"; "only" for a category of one record); every text is cut at :data:`CLIP` characters (an ellipsis marks the cut).
A ``judge`` column (win/tie/loss rates) is passed through when the table has one.
"""
from __future__ import annotations

import json

from dollyflow.core.evaluation.bootstrap import OVERALL
from dollyflow.core.evaluation.headline import ROUGE_L, explain, headline_metric
from dollyflow.core.evaluation.metrics import METRICS, UNSCORED

EXAMPLES_PER_KIND = 1    # best and worst records per category
CLIP = 400               # characters of each text shown
ELLIPSIS = "…"
JSON_COLUMNS = ("sides", "parameters", "reasons", "aggregates", "comparisons", "headline", "judge")
RAN = ("changed", "unchanged")


def clip(text, n: int = CLIP) -> str | None:
    """``text`` cut at ``n`` characters with an ellipsis (None stays None)."""
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= n else text[:n].rstrip() + ELLIPSIS


def _loads(value):
    if value is None or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return None


def collect_evaluation(store, tables, record: dict, version_of) -> dict:
    """The evaluation part of the report's data: ``{"ran": False, "reason": ...}`` when the run
    had no evaluate job, else the eval_runs row (``sides``, versions, ``headline``,
    ``aggregates``, ``comparisons``, ``judge``, ``reasons``, ``parameters``), the headline note,
    where it was read from (``source``), the MLflow logging the job did, and ``examples``."""
    job = (record.get("jobs") or {}).get("evaluate")
    if not job:
        return {"ran": False, "reason": "the run had no evaluate job"}
    summary = job.get("summary") or {}
    if job.get("status") not in RAN:
        why = summary.get("skipped") or job.get("error") or job.get("status")
        return {"ran": False, "reason": f"evaluate {job.get('status')}: {why}"}

    row, source = _eval_run(store, tables, summary, version_of("eval_runs"))
    parameters = row.get("parameters") or {}
    judged = bool(parameters.get("judge")) or bool(row.get("judge"))
    headline = row.get("headline") or {}
    categories = sorted(c for c in headline if c != OVERALL)
    out = {"ran": True, "status": job.get("status"), "source": source,
           "run_id": row.get("run_id") or summary.get("run_id"),
           **{k: row.get(k) for k in ("silver_version", "predictions_version", "eval_records_version", "records",
                                      "compared", "scored", "fingerprint", "reasons", "parameters", "sides",
                                      "headline", "aggregates", "comparisons", "judge")},
           "not_in_every_model": summary.get("not_in_every_model"), "not_in_silver": summary.get("not_in_silver"),
           "finish_reasons": summary.get("finish_reasons"), "judged": judged,
           "headline_note": explain(categories, judged=judged),
           "mlflow": summary.get("mlflow"), "mlflow_skipped": summary.get("mlflow_skipped"),
           "clip": CLIP, "examples": [], "examples_note": None}
    try:
        out["examples"], out["examples_note"] = _examples(store, tables, out, categories)
    except Exception as exc:  # noqa: BLE001 - the figures stand without the examples; say why they are absent
        out["examples_note"] = f"no examples: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return out


def _eval_run(store, tables, summary: dict, version) -> tuple[dict, str]:
    """The eval_runs row of the job's run_id at ``version`` (the run's record), else the job's
    summary in run.json, which holds the same figures."""
    from pyspark.sql import functions as F

    run_id = summary.get("run_id")
    if version is None:
        version = summary.get("eval_runs_version")
    where = f"{store.location(tables.eval_runs)} v{version}"
    if run_id and version is not None:
        df = store.read(tables.eval_runs, int(version))
        r = df.where(F.col("run_id") == run_id).orderBy(F.col("finished_at").desc()).limit(1).collect()
        if r:
            row = r[0].asDict()
            for k in JSON_COLUMNS:
                if k in row:
                    row[k] = _loads(row[k])
            return row, where
    row = {k: summary.get(k) for k in ("run_id", "silver_version", "predictions_version", "eval_records_version",
                                       "records", "compared", "scored", "fingerprint", "reasons", "parameters",
                                       "sides", "headline", "aggregates", "comparisons", "judge")}
    return row, f"the run record's evaluate summary (no row of {run_id} in {where})"


def _side_filter(sides: list[dict]):
    from pyspark.sql import functions as F

    cond = F.lit(False)
    for s in sides:
        cond = cond | ((F.col("model_sha") == s["model_sha"]) & (F.col("params_sha") == s["params_sha"]))
    return cond


def _examples(store, tables, ev: dict, categories: list[str]) -> tuple[list[dict], str | None]:
    """Per category, the compared records with the highest and the lowest value of the headline
    metric of the last side (the candidate), with every side's prediction and value beside the
    instruction and reference."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    sides = ev.get("sides") or []
    if not sides or ev.get("eval_records_version") is None or ev.get("silver_version") is None:
        return [], "no examples: the evaluation recorded no sides or versions"
    last = sides[-1]
    sv = int(ev["silver_version"])
    records = store.read(tables.eval_records, int(ev["eval_records_version"]))
    mine = (records.where((F.col("silver_version") == sv) & _side_filter(sides))
            .withColumn("category", F.coalesce(F.col("category"), F.lit(""))))
    every = (mine.groupBy("record_id").agg(F.countDistinct("model_sha", "params_sha").alias("_k"))
             .where(F.col("_k") == len(sides)).select("record_id"))
    cols = set(records.columns)
    metric_of, fallback = {}, []
    for cat in categories:
        m = headline_metric(cat, judged=ev.get("judged", False))
        if m not in cols:      # the judge's score is per pair of answers, not a column per answer
            fallback.append(cat)
            m = ROUGE_L
        metric_of[cat] = m
    if not metric_of:
        return [], "no examples: no category was compared"
    value = F.lit(None).cast("double")
    for cat, m in metric_of.items():
        value = F.when(F.col("category") == cat, F.col(m)).otherwise(value)
    reason = F.coalesce(F.col("reason"), F.lit(""))
    candidate = (mine.where((F.col("model_sha") == last["model_sha"]) & (F.col("params_sha") == last["params_sha"]))
                 .join(every, "record_id", "left_semi")
                 .where(~reason.isin(*UNSCORED))
                 .withColumn("_v", value).where(F.col("_v").isNotNull() & ~F.isnan("_v")))
    best = Window.partitionBy("category").orderBy(F.col("_v").desc(), F.col("record_id"))
    worst = Window.partitionBy("category").orderBy(F.col("_v").asc(), F.col("record_id").desc())
    picked = (candidate.withColumn("_b", F.row_number().over(best)).withColumn("_w", F.row_number().over(worst))
              .where((F.col("_b") <= EXAMPLES_PER_KIND) | (F.col("_w") <= EXAMPLES_PER_KIND))
              .select("record_id", "category", "_v", "_b", "_w").collect())
    if not picked:
        return [], "no examples: no compared record of the last side has a value of its headline metric"
    ids = sorted({r["record_id"] for r in picked})

    # every side's metrics and prediction of those records, and their reference in silver
    metric_rows = (mine.where(F.col("record_id").isin(ids))
                   .select("record_id", "model_sha", "params_sha", "prediction_sha", "finish_reason", "reason",
                           *[m for m in METRICS if m in cols]).collect())
    by_side = {(r["record_id"], r["model_sha"], r["params_sha"]): r.asDict() for r in metric_rows}
    texts: dict = {}
    if ev.get("predictions_version") is not None:
        preds = store.read(tables.predictions, int(ev["predictions_version"]))
        sha = F.sha2(F.concat_ws("\u0001", F.coalesce(F.col("response"), F.lit("\u0000")),
                                 F.coalesce(F.col("finish_reason"), F.lit(""))), 256)
        for r in (preds.where(F.col("record_id").isin(ids) & _side_filter(sides))
                  .select("record_id", "model_sha", "params_sha", "response", "finish_reason",
                          sha.alias("prediction_sha")).collect()):
            key = (r["record_id"], r["model_sha"], r["params_sha"])
            scored = by_side.get(key, {}).get("prediction_sha")
            if key not in texts or r["prediction_sha"] == scored:    # the prediction that was scored
                texts[key] = r.asDict()
    ref = {r["record_id"]: r.asDict() for r in
           store.read(tables.silver, sv).where(F.col("record_id").isin(ids))
           .select("record_id", "instruction", "context", "response").collect()}

    # a category whose best and worst score the same (every answer as good, or as bad): one example
    span = {}
    for r in picked:
        lo, hi = span.get(r["category"], (r["_v"], r["_v"]))
        span[r["category"]] = (min(lo, r["_v"]), max(hi, r["_v"]))
    examples = []
    for r in sorted(picked, key=lambda r: (r["category"], r["_b"] != 1, -r["_v"], r["record_id"])):
        metric = metric_of.get(r["category"], ROUGE_L)
        kind = "best" if r["_b"] <= EXAMPLES_PER_KIND else "worst"
        if r["_b"] <= EXAMPLES_PER_KIND and r["_w"] <= EXAMPLES_PER_KIND:
            kind = "only"    # the category's one record
        elif span[r["category"]][0] == span[r["category"]][1]:
            if r["_b"] > EXAMPLES_PER_KIND:
                continue
            kind = "all equal"
        s = ref.get(r["record_id"], {})
        preds = []
        for side in sides:
            key = (r["record_id"], side["model_sha"], side["params_sha"])
            m, t = by_side.get(key, {}), texts.get(key, {})
            preds.append({"label": side["label"], "response": clip(t.get("response")),
                          "finish_reason": t.get("finish_reason", m.get("finish_reason")),
                          "value": m.get(metric), "reason": m.get("reason"),
                          "found": bool(t)})
        examples.append({"category": r["category"], "kind": kind, "record_id": r["record_id"], "metric": metric,
                         "value": float(r["_v"]), "instruction": clip(s.get("instruction")),
                         "context": clip(s.get("context")), "reference": clip(s.get("response")),
                         "predictions": preds})
    note = None
    if fallback:
        note = (f"ranked by ROUGE-L in {', '.join(fallback)}: the judge's verdict is on a pair of answers, "
                "not a value per answer")
    return examples, note
