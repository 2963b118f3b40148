"""evaluate: answer quality of predictions against silver's reference responses -> ``eval_records``
and one ``eval_runs`` row.

Which predictions (``conf/jobs/evaluate.yaml``): ``evaluate.models`` lists the models to compare,
the first being baseline A; each entry is a model_sha (or a prefix of 8+ hex digits), a model
directory (its weights hashed as infer does), the ``model`` column as infer wrote it, or an infer
run_id, and selects every parameter set that model has in ``predictions`` (``evaluate.params_sha``
narrows them). Empty: the model and parameters of the newest infer run. Each selected (model_sha,
params_sha) is a *side*, labelled A, B, C ... A selector matching nothing fails naming it.

The references are silver's ``response`` and ``category`` at ``evaluate.silver_version`` (default:
the current version, recorded). Only records predicted by every side and present in silver are
compared (the others are counted); none left is an error.

Per record and side (:mod:`dollyflow.engine.evaluate`, on the workers): ROUGE-1/2/L, BLEU, chrF,
SQuAD token F1 and exact match, length ratio, and ``reason`` when a side could not be scored
normally (an empty or missing reference: no metrics; an error or empty prediction: zeros), see
:mod:`dollyflow.core.evaluation.metrics`. Rows land in ``eval_records`` (keys, category, model,
model_sha, params_sha, silver_version, finish_reason, prediction_sha, the metrics, reason, run_id,
created_at) by a merge on (record_id, model_sha, params_sha, silver_version): rows already stored
for the same prediction (``prediction_sha``: sha256 of its text and finish reason) are not scored
again, a prediction infer has since replaced (an error retried) updates its row, and a rerun with
the same inputs writes nothing to eval_records.

The optional judge (``evaluate.judge_model``, :mod:`dollyflow.engine.judge`), a separate stage so
that a run without one costs nothing more: every side after A is judged against A
(``judge_against: baseline``; with one side, against the reference, and the summary says so) or
every side against silver's reference response (``reference``; rows with an empty reference are
not judged, counted). The judge model is resolved, fetched and hashed as infer resolves its
model and answers through the same batched generator on the workers, one load per Python worker;
each row is asked both orders and combined into a win, tie or loss for the side, or counted as
unparseable. Its verdict, both raw answers, any generation error, the judge's sha, what it judged
against and ``judge_key`` (sha256 of the judge, its parameters, the rubric, the baseline and
both answers) land in the same eval_records rows, in the same merge as the metrics: a row whose
stored key matches is not judged again, a changed judge, baseline or answer updates the columns,
and a replaced prediction scored without a judge clears them.

On the driver (:mod:`dollyflow.core.evaluation.compare`): per side and metric the mean and its
seeded percentile bootstrap interval overall and per category, the paired bootstrap of each side
against A, and the headline table (each category's headline metric,
:mod:`dollyflow.core.evaluation.headline`: with a judge, the open-ended categories are headed by
the judge score, wins + half the ties, side A scoring the ½ of an answer against itself in
baseline mode; without one, by ROUGE-L). With a judge, each judged side's win/tie/loss rates
with intervals overall and per category, unparseable rows counted beside them. One
``eval_runs`` row records the sides, the table versions and all of it as JSON (the judge's part
in ``judge``); the summary carries the same.

Optional, ``evaluate.harness_tasks`` (:func:`harness_scores`): lm-evaluation-harness on each
side's model, on the driver before the scoring (a bad task entry fails before anything is
written), once per distinct model (:mod:`dollyflow.core.evaluation.harness`: lm-eval task names
need the hub; task YAML files on local data run offline). The model is found with infer's
loading code, from the ``evaluate.models`` directory that chose the side or else the
predictions' ``model`` column, and must hash to the side's model_sha. The scores land in
``eval_runs.harness`` ({side label: {task: {metric: value, metric_stderr: value, samples: n}}})
and the summary's ``harness``; the harness settings join the run's parameters (and so its
fingerprint); eval_records is untouched.

Then, the tables committed (``evaluate.mlflow``, :func:`log_to_mlflow`): each compared model the
train job tracked (its provenance, which infer keeps in ``predictions.model_info``, names an
MLflow run and tracking URI) gets the figures in its MLflow run, ``eval/<side>/<category>/<metric>``
with ``_lo`` and ``_hi``, the differences as ``eval/B-A/...``, and the eval_runs row as
``evaluation.json``; a run already holding this evaluation (its fingerprint tag) is left alone.
No such run: ``mlflow`` is null and ``mlflow_skipped`` says why; a failure (an unreachable
server) is a warning and an entry in the summary, never a failed job.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from datetime import datetime, timezone

import numpy as np

from dollyflow.config import Config, on_databricks, redact_uri
from dollyflow.core.evaluation.compare import judge_rates, judge_values, summarize
from dollyflow.core.evaluation.harness import run_harness
from dollyflow.core.evaluation.headline import JUDGE, explain
from dollyflow.core.evaluation.metrics import METRICS, UNSCORED
from dollyflow.core.models.fetch import resolve_model_dir
from dollyflow.core.models.files import model_digest
from dollyflow.core.training import tracking
from dollyflow.engine.delta import DeltaStore
from dollyflow.engine.evaluate import RECORD_KEYS, SCORED_COLUMNS, Side, compared_rows, find_sides, score_rows
from dollyflow.engine.infer import load_accumulator, ship_model, summarize_counts
from dollyflow.engine.judge import JUDGE_COLUMNS, judge_rows, judge_verdicts, resolve_judge
from dollyflow.engine.session import task_count

RUNS_DDL = ("run_id string, started_at timestamp, finished_at timestamp, sides string, silver_version long, "
            "predictions_version long, eval_records_version long, records long, compared long, scored long, "
            "parameters string, fingerprint string, reasons string, aggregates string, comparisons string, "
            "headline string, seconds double, harness string, judge string")


#: A stored row is updated when its prediction was replaced (infer retried an error), or when the
#: incoming row carries a verdict of another judge key (another judge, baseline or answer).
UPDATE_WHEN = ("t.prediction_sha <> s.prediction_sha OR (s.judge_key IS NOT NULL AND "
               "(t.judge_key IS NULL OR t.judge_key <> s.judge_key))")


def say(msg: str) -> None:
    print(f"dollyflow evaluate: {msg}", file=sys.stderr, flush=True)


def run(cfg: Config, spark) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    t0 = time.time()
    started = datetime.now(timezone.utc)
    e, t = cfg.evaluate, cfg.tables
    store = DeltaStore(spark, t)
    silver_version = e.silver_version if e.silver_version is not None else store.version(t.silver)
    if silver_version is None:
        raise RuntimeError(f"the silver table {store.location(t.silver)} does not exist: run ingest and dedupe first")
    predictions_version = store.version(t.predictions)
    sides = find_sides(store, t.predictions, list(e.models), list(e.params_sha))
    for s in sides:
        say(f"side {s.label}: {s.model} (model_sha {s.model_sha[:12]}, params_sha {s.params_sha}): {s.rows} predictions")
    rows, counts = compared_rows(store, t.predictions, t.silver, int(silver_version), sides)
    if counts["compared"] == 0:
        raise RuntimeError(
            f"no record to compare: of the {counts['records']} records the sides "
            f"{', '.join(f'{s.label} ({s.model}, params_sha {s.params_sha})' for s in sides)} predicted, "
            f"{counts['not_in_every_model']} lack a prediction of some side and {counts['not_in_silver']} are not in "
            f"{store.location(t.silver)} v{silver_version}")

    harness = harness_scores(cfg, sides)     # on the driver, before the Spark work: a bad task fails early

    judge = resolve_judge(e, sides) if e.judge_model else None
    if judge is not None:   # the workers that cannot read the judge model get the driver's copy
        judge = dataclasses.replace(judge, spec=ship_model(spark, judge.spec, cfg.tables.shared_mounts))
        say(f"judge: {judge.spec.source.display} (sha {judge.spec.digest[:12]}), sides "
            f"{', '.join(judge.judged)} against "
            + (f"side A ({judge.baseline.model}, params_sha {judge.baseline.params_sha})" if judge.baseline
               else "silver's reference responses"))
        if judge.note:
            say(judge.note)

    # score only what eval_records does not hold yet for the same prediction, judge only what it
    # does not hold yet with the same judge key; both land in one merge
    base_version = store.version(t.eval_records)
    stored = store.read(t.eval_records, base_version) if base_version is not None else None
    if stored is not None:
        lacking = [c for c in JUDGE_COLUMNS if c not in stored.columns]
        if lacking:
            raise RuntimeError(f"{store.location(t.eval_records)} predates the judge columns {lacking}: move it away "
                               "(or set tables.eval_records to a new table) and run evaluate again to rebuild it")
    todo = rows
    if stored is not None:
        todo = rows.join(stored.select(*RECORD_KEYS, "prediction_sha"), RECORD_KEYS + ["prediction_sha"], "left_anti")
    partitions = task_count(spark, e.partitions)
    scored = score_rows(todo, partitions)
    t1 = time.time()
    scored = scored.persist(StorageLevel.MEMORY_AND_DISK)
    held = [scored]
    judge_out = None
    try:
        n_scored = scored.count()
        score_seconds = time.time() - t1
        if judge is None:
            source = scored.select("*", *[F.lit(None).cast("string").alias(c) for c in JUDGE_COLUMNS])
            n_judged = 0
        else:
            wanted, unjudged = judge_rows(rows, store.read(t.silver, int(silver_version)), judge, sides)
            jtodo = wanted
            if stored is not None:
                jtodo = wanted.join(stored.select(*RECORD_KEYS, "judge_key"), RECORD_KEYS + ["judge_key"], "left_anti")
            acc = load_accumulator(spark)
            tj = time.time()
            verdicts = judge_verdicts(jtodo, judge, partitions, acc).persist(StorageLevel.MEMORY_AND_DISK)
            held.append(verdicts)
            n_judged = verdicts.count()
            judge_out = {"generated": int(n_judged), "seconds": round(time.time() - tj, 3),
                         "workers": summarize_counts(acc.value if acc is not None else None)}
            say(f"judge: {n_judged} rows judged (both orders) in {judge_out['seconds']} s")
            # rows only the judge changes: their stored metrics, with the new verdict
            only_judged = scored.limit(0).select(*SCORED_COLUMNS)
            if stored is not None:
                only_judged = (stored.join(verdicts.select(*RECORD_KEYS), RECORD_KEYS, "left_semi")
                               .join(scored.select(*RECORD_KEYS), RECORD_KEYS, "left_anti")
                               .select(*SCORED_COLUMNS))
            source = scored.select(*SCORED_COLUMNS).unionByName(only_judged).join(verdicts, RECORD_KEYS, "left")
        source = (source.withColumn("run_id", F.lit(cfg.run_id)).withColumn("created_at", F.current_timestamp()))
        if n_scored or n_judged:
            commit = store.merge(source, t.eval_records, RECORD_KEYS, job="evaluate", run_id=cfg.run_id,
                                 update=True, update_when=UPDATE_WHEN)
            written = (f"{commit.inserted} rows inserted, {commit.updated} rows updated (replaced predictions"
                       + (", new verdicts" if judge is not None else "") + ")")
        else:
            written = (f"every compared row is already scored{' and judged' if judge is not None else ''}: "
                       f"{t.eval_records} is unchanged")
    finally:
        for df in held:
            df.unpersist()
    say(written)
    records_version = store.version(t.eval_records)

    # the compared rows' metrics (and verdicts), from eval_records, to the driver
    cols = ["record_id", "category", "model_sha", "params_sha", "finish_reason", "reason", *METRICS]
    read = (store.read(t.eval_records, records_version)
            .join(rows.select(*RECORD_KEYS, "prediction_sha"), RECORD_KEYS + ["prediction_sha"], "left_semi"))
    if judge is not None:
        read = (read.join(wanted.select(*RECORD_KEYS, F.col("judge_key").alias("wanted_key")), RECORD_KEYS, "left")
                .join(unjudged.select(*RECORD_KEYS, F.col("reason").alias("unjudged")), RECORD_KEYS, "left"))
        cols += ["judge_verdict", "judge_key", "wanted_key", "unjudged"]
    stored_rows = read.select(*cols).toPandas()
    by_side = {}
    for s in sides:
        part = stored_rows[(stored_rows["model_sha"] == s.model_sha) & (stored_rows["params_sha"] == s.params_sha)]
        by_side[s.label] = part.drop_duplicates("record_id").set_index("record_id").sort_index()
    ids = by_side[sides[0].label].index
    for s in sides[1:]:
        if not by_side[s.label].index.equals(ids):
            raise RuntimeError(f"eval_records v{records_version} does not hold every compared record of side {s.label} "
                               "(a concurrent merge?): run evaluate again")
    if len(ids) != counts["compared"]:
        raise RuntimeError(f"eval_records v{records_version} holds {len(ids)} of the {counts['compared']} compared "
                           "records (a concurrent merge?): run evaluate again")
    categories = [c if isinstance(c, str) else "" for c in by_side[sides[0].label]["category"]]
    values = {label: {m: df[m].to_numpy(dtype=np.float64, na_value=np.nan) for m in METRICS}
              for label, df in by_side.items()}
    metrics = list(METRICS)
    judge_summary = None
    t2 = time.time()
    if judge is not None:
        judge_summary = _judge_summary(judge, sides, by_side, categories, records_version, e)
        judge_summary.update(judge_out or {})
        for s in sides:
            if s.label in judge.judged:
                values[s.label][JUDGE] = judge_values(judge_summary["verdicts"].pop(s.label))
            else:   # the baseline against itself: a tie by construction
                values[s.label][JUDGE] = np.full(len(ids), 0.5)
        del judge_summary["verdicts"]
        metrics.append(JUDGE)
    result = summarize([s.label for s in sides], categories, values, seed=e.seed, resamples=e.resamples,
                       level=e.level, metrics=metrics, judged=judge is not None)
    bootstrap_seconds = time.time() - t2
    reasons = {label: {r: int(n) for r, n in df["reason"].value_counts().items()} for label, df in by_side.items()}
    finish = {label: {str(r): int(n) for r, n in df["finish_reason"].fillna("null").value_counts().items()}
              for label, df in by_side.items()}
    unscored = {label: sum(n for r, n in rs.items() if r in UNSCORED) for label, rs in reasons.items()}

    parameters = {"seed": e.seed, "resamples": e.resamples, "level": e.level, "metrics": list(METRICS),
                  "judge": None if judge is None else {
                      **judge.identity(), "requested": judge.requested, "window_rows": e.judge_window_rows}}
    if harness is not None:
        parameters["harness"] = harness["parameters"]
    side_dicts = [s.to_dict() for s in sides]
    fingerprint = hashlib.sha256(json.dumps(
        {"sides": [(s.model_sha, s.params_sha) for s in sides], "silver_version": int(silver_version),
         "records_version": records_version, "parameters": parameters}, sort_keys=True).encode()).hexdigest()[:16]
    seconds = round(time.time() - t0, 2)
    row = (cfg.run_id, started, datetime.now(timezone.utc), json.dumps(side_dicts, sort_keys=True),
           int(silver_version), predictions_version, records_version, counts["records"], counts["compared"],
           int(n_scored), json.dumps(parameters, sort_keys=True), fingerprint, json.dumps(reasons, sort_keys=True),
           json.dumps(result["aggregates"], sort_keys=True), json.dumps(result["comparisons"], sort_keys=True),
           json.dumps(result["headline"], sort_keys=True), float(seconds),
           json.dumps(harness["scores"], sort_keys=True) if harness is not None else None,
           None if judge_summary is None else json.dumps(judge_summary, sort_keys=True))
    runs = store.append_rows([row], RUNS_DDL, t.eval_runs, job="evaluate", run_id=cfg.run_id, evolve_schema=True)
    # the tables are committed: from here on, nothing fails the job
    document = dict(zip([c.split()[0] for c in RUNS_DDL.split(", ")], row))
    document.update({k: json.loads(document[k]) for k in ("sides", "parameters", "reasons", "aggregates",
                                                          "comparisons", "headline", "harness", "judge")
                     if document.get(k) is not None})
    mlflow_info, mlflow_skipped = log_to_mlflow(cfg, store, sides, document, fingerprint)
    return {
        "job": "evaluate", "run_id": cfg.run_id, "sides": side_dicts,
        "silver": store.location(t.silver), "silver_version": int(silver_version),
        "predictions": store.location(t.predictions), "predictions_version": predictions_version,
        "eval_records": store.location(t.eval_records), "eval_records_version": records_version,
        "eval_runs": store.location(t.eval_runs), "eval_runs_version": int(runs),
        **counts, "scored": int(n_scored), "judged": int(n_judged), "written": written,
        "reasons": reasons, "unscored_rows": unscored, "finish_reasons": finish,
        "parameters": parameters, "fingerprint": fingerprint,
        "headline": result["headline"], "aggregates": result["aggregates"], "comparisons": result["comparisons"],
        "harness": harness,
        "judge": judge_summary,
        "headline_note": explain(sorted(set(categories)), judged=judge is not None),
        "score_seconds": round(score_seconds, 3), "bootstrap_seconds": round(bootstrap_seconds, 3),
        "rows_per_second": round(n_scored / score_seconds, 1) if n_scored and score_seconds > 0 else 0.0,
        "job_seconds": seconds, "mlflow": mlflow_info, "mlflow_skipped": mlflow_skipped,
    }


def side_model_dir(side: Side) -> str:
    """The local directory of a side's model, through the loading code infer uses (a directory as
    it is; an MLflow, hub or object-store source fetched into the model cache), tried from the
    ``evaluate.models`` entry that chose the side when that is a directory, else from the
    predictions' ``model`` column; its weights must hash to the side's ``model_sha``."""
    tried = []
    chosen_by_dir = side.selector and os.path.isdir(os.path.expanduser(side.selector))
    for source in dict.fromkeys(([side.selector] if chosen_by_dir else []) + [side.model]):
        try:
            model_dir = resolve_model_dir(source)
            found = model_digest(model_dir)
        except (OSError, ValueError, RuntimeError) as err:
            tried.append(f"{source!r}: {type(err).__name__}: {err}")
            continue
        if found == side.model_sha:
            return model_dir
        tried.append(f"{source!r}: its weights at {model_dir} hash to {found[:12]}")
    raise RuntimeError(f"evaluate.harness_tasks: cannot find the model of side {side.label} (model_sha "
                       f"{side.model_sha[:12]}) to run the harness on: " + "; ".join(tried)
                       + ". Name its directory in evaluate.models")


def harness_scores(cfg: Config, sides: list[Side]) -> dict | None:
    """lm-evaluation-harness on every side's model (``evaluate.harness_tasks``; None when empty),
    on the driver, once per distinct model (the parameter sets of one model share its scores):
    ``scores`` {side label: {task: {metric: value, ...}}} for eval_runs, ``parameters`` for the
    run's fingerprint, and per model where and how long it ran."""
    e = cfg.evaluate
    if not e.harness_tasks:
        return None
    by_sha: dict[str, dict] = {}
    for side in sides:
        if side.model_sha in by_sha:
            continue
        model_dir = side_model_dir(side)
        say(f"harness: {len(e.harness_tasks)} task entr{'y' if len(e.harness_tasks) == 1 else 'ies'} on side "
            f"{side.label}'s model {model_dir}")
        by_sha[side.model_sha] = run_harness(model_dir, list(e.harness_tasks), device=e.harness_device,
                                             batch_size=e.harness_batch_size, limit=e.harness_limit, seed=e.seed)
    first = next(iter(by_sha.values()))
    return {
        "scores": {s.label: by_sha[s.model_sha]["tasks"] for s in sides},
        "parameters": {"tasks": list(e.harness_tasks), "limit": e.harness_limit, "seed": e.seed,
                       "lm_eval_version": first["lm_eval_version"]},
        "models": {sha: {k: v for k, v in r.items() if k != "tasks"} for sha, r in by_sha.items()},
    }
FINGERPRINT_TAG = "dollyflow.evaluate.fingerprint"


def _key(part) -> str:
    """One level of an MLflow metric name: letters, digits, ``_ - . space`` (a category such
    as ``a/b`` or ``$x`` keeps its place without adding a level or failing the logging)."""
    text = re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(part)).strip()
    return text or "none"


def mlflow_metrics(result: dict) -> dict[str, float]:
    """The evaluation as MLflow metrics: per side, ``eval/<side>/<category>/<metric>`` with
    ``_lo`` and ``_hi`` (its interval) for each category's headline metric and for ``overall``
    (the headline column and every reference metric); per comparison ``eval/<B-A>/...`` the
    paired difference of the same, with its interval."""
    out: dict[str, float] = {}

    def put(prefix: str, iv: dict | None, value_key: str) -> None:
        if not iv or iv.get(value_key) is None:
            return
        out[prefix] = float(iv[value_key])
        for bound, suffix in (("low", "_lo"), ("high", "_hi")):
            if iv.get(bound) is not None:
                out[prefix + suffix] = float(iv[bound])

    for cat, h in (result.get("headline") or {}).items():
        metric = _key(h.get("metric"))
        for label, iv in (h.get("sides") or {}).items():
            put(f"eval/{_key(label)}/{_key(cat)}/{metric}", iv, "mean")
        for comp, c in (h.get("diff") or {}).items():
            put(f"eval/{_key(comp.replace(' ', ''))}/{_key(cat)}/{metric}", c, "diff")
    for label, by_metric in (result.get("aggregates") or {}).items():
        for metric, agg in by_metric.items():
            put(f"eval/{_key(label)}/overall/{_key(metric)}", agg.get("overall"), "mean")
    for comp, by_metric in (result.get("comparisons") or {}).items():
        for metric, c in by_metric.items():
            put(f"eval/{_key(comp.replace(' ', ''))}/overall/{_key(metric)}", c.get("overall"), "diff")
    return out


def _model_runs(store, predictions: str, sides) -> dict[str, dict]:
    """The MLflow runs of the sides' models, from the provenance infer stored beside their
    predictions (``model_info``: the train job's ``dollyflow_model.json``): run id -> tracking
    URI and the labels of the sides whose model it trained."""
    from pyspark.sql import functions as F

    df = store.read(predictions)
    if "model_info" not in df.columns:
        return {}
    shas = sorted({s.model_sha for s in sides})
    infos = {r["model_sha"]: r["info"] for r in df.where(F.col("model_sha").isin(shas) & F.col("model_info").isNotNull())
             .groupBy("model_sha").agg(F.max("model_info").alias("info")).collect()}
    runs: dict[str, dict] = {}
    for s in sides:
        try:
            info = json.loads(infos.get(s.model_sha) or "null") or {}
        except ValueError:
            continue
        run_id = info.get("mlflow_run_id") if isinstance(info, dict) else None
        if run_id:
            entry = runs.setdefault(str(run_id), {"tracking_uri": info.get("mlflow_tracking_uri"), "sides": []})
            entry["sides"].append(s.label)
    return runs


def log_to_mlflow(cfg: Config, store, sides, document: dict, fingerprint: str) -> tuple[dict | None, str | None]:
    """Log the evaluation to the MLflow run of each compared model that has one (the run the
    train job created, on the tracking URI it used): :func:`mlflow_metrics`, tags naming the
    sides and the evaluate run, and the eval_runs row as ``evaluation.json``. A run that already
    holds this evaluation (its fingerprint tag) is left alone. Returns ``(info, None)`` or
    ``(None, why nothing was logged)``; a failure is recorded in ``info``, never raised."""
    if not cfg.evaluate.mlflow:
        return None, "evaluate.mlflow=false"
    try:
        runs = _model_runs(store, cfg.tables.predictions, sides)
    except Exception as exc:  # noqa: BLE001 - the evaluation stands without it
        say(f"WARNING: could not read the models' provenance from {cfg.tables.predictions}: {exc}")
        return None, f"could not read the models' provenance: {type(exc).__name__}: {exc}"
    if not runs:
        return None, ("no compared model has an MLflow run (predictions.model_info holds no mlflow_run_id: "
                      "a model not trained by the train job with MLflow on)")
    if not tracking.available():
        return None, "mlflow is not installed (pip install mlflow-skinny)"
    metrics = mlflow_metrics(document)
    artifact = json.dumps(document, sort_keys=True, indent=1, default=str).encode("utf-8")
    names = ", ".join(f"{s.label}={s.model} (params_sha {s.params_sha})" for s in sides)
    info = {"runs": []}
    for run_id, r in runs.items():
        uri = r["tracking_uri"]
        if not uri:
            uri = tracking.resolve(dataclasses.asdict(cfg.train), cfg.tables.warehouse if not cfg.tables.catalog
                                   else "", on_databricks())[0]
        entry = {"run_id": run_id, "tracking_uri": redact_uri(uri) if uri else None, "sides": r["sides"]}
        if not uri:
            entry.update(status="skipped", error="no tracking URI recorded or configured")
        else:
            tags = {"dollyflow.evaluate.run_id": cfg.run_id, "dollyflow.evaluate.sides": names,
                    "dollyflow.evaluate.this_model": ",".join(r["sides"]), FINGERPRINT_TAG: fingerprint}
            try:
                entry.update(tracking.log_to_run(uri, run_id, metrics, tags=tags,
                                                 artifacts={"evaluation.json": artifact},
                                                 skip_if_tag=(FINGERPRINT_TAG, fingerprint)))
            except Exception as exc:  # noqa: BLE001 - the tables are committed; tracking must not fail the job
                entry.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500])
        say(f"MLflow run {run_id} (sides {','.join(r['sides'])}): {entry['status']}"
            + (f", {entry['metrics']} metrics and evaluation.json" if entry.get("metrics") else "")
            + (f" -- WARNING: {entry['error']}" if entry.get("error") else ""))
        info["runs"].append(entry)
    return info, None


def _judge_summary(judge, sides, by_side: dict, categories: list, records_version, e) -> dict:
    """The judge's part of the summary and of eval_runs (and, under ``verdicts``, each judged
    side's outcome per record, None where it was not judged, for the caller)."""
    verdicts, rates, unjudged = {}, {}, {}
    for s in sides:
        if s.label not in judge.judged:
            continue
        df = by_side[s.label]
        current = df["judge_key"].eq(df["wanted_key"]) & df["wanted_key"].notna()
        stale = int((df["wanted_key"].notna() & ~current).sum())
        if stale:
            raise RuntimeError(f"eval_records v{records_version} lacks the verdicts of {stale} rows of side {s.label} "
                               "(a concurrent merge?): run evaluate again")
        v = [x if ok else None for x, ok in zip(df["judge_verdict"], current)]
        verdicts[s.label] = v
        rates[s.label] = judge_rates(categories, v, seed=e.seed, resamples=e.resamples, level=e.level)
        unjudged[s.label] = {str(r): int(n) for r, n in df["unjudged"].dropna().value_counts().items()}
    unparseable = {label: r["overall"]["unparseable"] for label, r in rates.items()}
    notes = [judge.note] if judge.note else []
    for label, r in rates.items():
        if r["judged"] and not r["overall"]["n"]:
            notes.append(f"side {label}: none of the {r['judged']} judged rows got a parseable verdict (the judge "
                         "answered neither A, B nor tie in one order or both): no rates")
    return {"model": judge.spec.source.display, "judge_sha": judge.spec.digest, "against": judge.against,
            "requested": judge.requested, "baseline": judge.baseline.label if judge.baseline else None,
            "against_key": judge.against_label, "sides": list(judge.judged), "params": judge.spec.identity(),
            "rates": rates, "unparseable": unparseable, "not_judged": unjudged, "notes": notes,
            "verdicts": verdicts}


def skip_reason(cfg: Config) -> str | None:
    """``dollyflow pipeline`` skips evaluation when infer did not run (no model configured): there
    are no predictions of this run to evaluate."""
    if cfg.evaluate.models:
        return None
    return None if cfg.infer.model else "no predictions to evaluate (infer.model is not set and evaluate.models is empty)"
