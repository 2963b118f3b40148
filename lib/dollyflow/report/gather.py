"""The Spark side of the run report: read what a pipeline run produced, at the table versions it
recorded (Delta time travel through :class:`~dollyflow.engine.delta.DeltaStore`), plus its shard
manifest and training metrics, into plain data that :mod:`dollyflow.report.html` draws.

Only aggregates and a handful of example rows come to the driver.
"""
from __future__ import annotations

import json

from dollyflow.config import TablesConfig, on_databricks, redact
from dollyflow.core.shards import read_manifest
from dollyflow.core.storage import absolute, exists, join, read_bytes, write_atomic
from dollyflow.core.training import tracking
from dollyflow.engine.delta import DeltaStore
from dollyflow.report.evaluation import collect_evaluation
from dollyflow.report.html import render_html
from dollyflow.runs import report_path

EXAMPLES = 3          # duplicate pairs per kind
SAMPLES = 6           # generations shown next to their references
LENGTH_BINS = 32      # token length histogram bins up to max_length


def _tables_config(record: dict) -> TablesConfig:
    t = TablesConfig()
    for k, v in (record.get("config", {}).get("tables") or {}).items():
        if hasattr(t, k):
            setattr(t, k, v)
    return t


def _version(record: dict, name: str):
    return (record.get("tables", {}).get(name) or {}).get("version")


def collect(spark, record: dict) -> dict:
    """Everything the report shows, as plain Python data."""
    from pyspark.sql import functions as F

    tables = _tables_config(record)
    store = DeltaStore(spark, tables)
    jobs = record.get("jobs", {})
    data: dict = {"run": {k: record.get(k) for k in ("run_id", "started_at", "finished_at", "seconds", "preset",
                                                       "env", "status", "unchanged", "files_root")},
                  "jobs": {n: {k: j.get(k) for k in ("status", "seconds")} for n, j in jobs.items()}}
    data["run"]["model"] = (record.get("config", {}).get("model") or {}).get("name")

    def read(logical: str):
        v = _version(record, logical)
        return None if v is None else store.read(getattr(tables, logical), int(v))

    # records per category: bronze and silver at the run's versions
    cats: dict = {}
    for logical in ("bronze", "silver"):
        df = read(logical)
        if df is not None:
            for r in df.groupBy("category").count().collect():
                cats.setdefault(r["category"] or "(none)", {})[logical] = int(r["count"])
    data["categories"] = cats

    q = read("quarantine")
    data["quarantine"] = {} if q is None else {r["reason"]: int(r["count"]) for r in q.groupBy("reason").count().collect()}
    data["quarantine_examples"] = [] if q is None else [
        {"reason": r["reason"], "where": f"{r['source_file'].rsplit('/', 1)[-1]}:{r['source_line']}",
         "detail": r["detail"]} for r in q.orderBy("source_file", "source_line").limit(5).collect()]

    # duplicates per kind, with example pairs (removed record next to its survivor)
    dup, bronze = read("duplicates"), read("bronze")
    data["duplicates"], data["duplicate_examples"] = {}, []
    if dup is not None:
        data["duplicates"] = {r["kind"]: int(r["count"]) for r in dup.groupBy("kind").count().collect()}
        if bronze is not None and data["duplicates"]:
            text = bronze.select("record_id", F.col("instruction"), F.col("response"))
            pairs = (dup.join(text, "record_id")
                     .join(text.select(F.col("record_id").alias("survivor_id"), F.col("instruction").alias("s_instruction"),
                                       F.col("response").alias("s_response")), "survivor_id"))
            for kind in sorted(data["duplicates"]):
                for r in pairs.where(F.col("kind") == kind).orderBy("similarity", "record_id").limit(EXAMPLES).collect():
                    data["duplicate_examples"].append({
                        "kind": kind, "similarity": float(r["similarity"]), "record_id": r["record_id"],
                        "survivor_id": r["survivor_id"], "instruction": r["instruction"], "response": r["response"],
                        "survivor_instruction": r["s_instruction"], "survivor_response": r["s_response"]})

    # filter: removed per stage and reason (filtered), redactions per kind (curated's redactions)
    data["filter"] = _filter(read("filtered"), read("curated"), (jobs.get("filter") or {}).get("summary") or {})

    # token lengths per split (the tokenized table) and the drops (the shard manifest)
    tok_summary = (jobs.get("tokenize") or {}).get("summary") or {}
    manifest = _manifest(tok_summary.get("shard_dir"))
    max_length = (manifest or {}).get("max_length") or tok_summary.get("max_length")
    data["tokens"] = {"max_length": max_length, "drops": (manifest or tok_summary).get("drops") or {},
                      "splits": {}, "shard_dir": tok_summary.get("shard_dir"),
                      "manifest_sha256": tok_summary.get("manifest_sha256")}
    tok = read("tokenized")
    if tok is not None and max_length:
        width = max(1, -(-int(max_length) // LENGTH_BINS))
        rows = (tok.groupBy("split", (F.floor(F.col("length") / width)).cast("int").alias("bin")).count().collect())
        for r in rows:
            s = data["tokens"]["splits"].setdefault(r["split"], {"width": width, "bins": {}})
            s["bins"][int(r["bin"])] = int(r["count"])
        for split, st in (manifest or {}).get("splits", {}).items():
            if split in data["tokens"]["splits"]:
                data["tokens"]["splits"][split].update(records=st.get("records"), tokens=st.get("tokens"))

    # training: the model directory's metrics.jsonl (the same entries MLflow got)
    tr = (jobs.get("train") or {}).get("summary") or {}
    data["train"] = {k: tr.get(k) for k in ("output_dir", "steps", "train_loss", "eval_loss", "tokens_per_s",
                                             "useful_tokens_per_s", "mlflow_run_id", "decision", "method",
                                             "launcher", "processes", "precision", "zero_stage")}
    data["train"]["metrics"] = _metrics(tr.get("output_dir"))
    data["train"]["mlflow"] = _mlflow(record, tr)

    # inference: the run's throughput, and the predictions of its model + parameters
    inf = (jobs.get("infer") or {}).get("summary") or {}
    data["infer"] = {k: inf.get(k) for k in ("rows_in", "generated", "already_predicted", "completion_tokens",
                                              "prompt_tokens", "generation_seconds", "tokens_per_second",
                                              "model", "model_sha", "params")}
    data["infer"]["finish_reasons"], data["infer"]["samples"] = {}, []
    pred = read("predictions")
    if pred is not None and inf.get("model_sha"):
        mine = pred.where((F.col("model_sha") == inf["model_sha"]) & (F.col("params_sha") == inf["params_sha"]))
        data["infer"]["finish_reasons"] = {str(r["finish_reason"]): int(r["count"])
                                           for r in mine.groupBy("finish_reason").count().collect()}
        silver = read("silver")
        if silver is not None and "record_id" in mine.columns:
            ref = silver.select("record_id", "category", "instruction", "context", F.col("response").alias("reference"))
            for r in mine.join(ref, "record_id").orderBy("record_id").limit(SAMPLES).collect():
                data["infer"]["samples"].append({k: r[k] for k in ("record_id", "category", "instruction", "context",
                                                                    "reference", "response", "finish_reason",
                                                                    "completion_tokens")})

    # evaluation: the run's eval_runs row and the best / worst examples per category
    data["evaluate"] = collect_evaluation(store, tables, record, lambda logical: _version(record, logical))

    # every table with its version at the end of the run and that commit's operation
    data["tables"] = []
    for logical, info in (record.get("tables") or {}).items():
        entry = {"table": logical, "location": info.get("location"), "version": info.get("version")}
        if info.get("version") is not None:
            name = getattr(tables, logical)
            hist = {h["version"]: h for h in store.history(name)}
            h = hist.get(int(info["version"]))
            if h:
                entry.update(operation=h.get("operation"), job=h.get("job"), written_by=h.get("run_id"),
                             timestamp=h.get("timestamp"))
        data["tables"].append(entry)
    return data


def _filter(filtered, curated, summary: dict) -> dict:
    """What the filter job removed and redacted, from its tables at the run's versions."""
    from pyspark.sql import functions as F
    if filtered is None or curated is None:
        return {"ran": False}
    removed: dict = {}
    for r in filtered.groupBy("stage", "reason").count().collect():
        removed.setdefault(r["stage"], {})[r["reason"]] = int(r["count"])
    spans = (curated.where(F.col("redactions").isNotNull())
             .select(F.explode(F.from_json("redactions", "array<struct<kind:string>>")).alias("r"))
             .groupBy("r.kind").count().collect())
    kept = curated.count()
    examples = [{k: r[k] for k in ("record_id", "stage", "reason", "detail", "span")}
                for r in filtered.orderBy("stage", "reason", "record_id").limit(EXAMPLES * 3).collect()]
    return {"ran": True, "removed": removed, "redactions": {r["kind"]: int(r["count"]) for r in spans},
            "rows_kept": kept, "rows_removed": sum(sum(v.values()) for v in removed.values()),
            "rows_in": kept + sum(sum(v.values()) for v in removed.values()),
            "records_redacted": curated.where(F.col("redactions").isNotNull()).count(),
            "languages": summary.get("languages") or {}, "examples": examples}


def _manifest(shard_dir: str | None) -> dict | None:
    if not shard_dir:
        return None
    try:
        return read_manifest(shard_dir)
    except (OSError, ValueError):
        return None


def _metrics(output_dir: str | None) -> list[dict]:
    if not output_dir:
        return []
    path = join(output_dir, "metrics.jsonl")
    if not exists(path):
        return []
    return [json.loads(line) for line in read_bytes(path).decode("utf-8").splitlines() if line.strip()]


def _mlflow(record: dict, train: dict) -> dict:
    """The MLflow run: id, tracking URI and experiment, as the train job resolved them."""
    if not train.get("mlflow_run_id"):
        return {}
    cfg = record.get("config", {})
    t, tables = cfg.get("train", {}), cfg.get("tables", {})
    try:
        uri, experiment, _ = tracking.resolve(t, tables.get("warehouse", "") if not tables.get("catalog") else "",
                                              on_databricks())
    except Exception:  # noqa: BLE001 - the run id is still worth showing
        uri, experiment = None, t.get("mlflow_experiment")
    return {"run_id": train["mlflow_run_id"], "tracking_uri": uri, "experiment": experiment}


def build_report(spark, cfg, record: dict, out: str | None = None) -> str:
    """Collect, draw and write the HTML report of ``record``; returns where it went."""
    html = render_html(redact(collect(spark, record)))   # the page is shared: no credentials in it
    path = absolute(out) if out else report_path(record["files_root"], record["run_id"])
    write_atomic(path, html.encode("utf-8"))
    return path
