"""infer: batch generation with a fine-tuned model -> the ``predictions`` Delta table.

Input (``conf/jobs/infer.yaml``): ``infer.query`` (one SQL *query*; the project's silver and
tokenized tables are temp views under those names) or ``infer.input_table`` (default silver)
restricted to one split of the ``tokenized`` table (``infer.split``, default test: the held-out
records). The query runs with the job's identity, so it is checked by Spark's own parser first
(:mod:`dollyflow.engine.query`): only SELECT / WITH ... SELECT / VALUES / TABLE / FROM ... SELECT
is accepted, anything else (DROP, INSERT, SET, GRANT, several statements ...) fails before
anything runs. The split is read from the ``tokenized`` table *at the version the model was
trained from* (the model's ``dollyflow_model.json``: ``dataset.tokenized_table``), so records the
model trained on are never scored as test after silver changed; a model without that provenance
(an MLflow or hub model) uses the current version, with a warning in the summary; a model
trained from another tokenized table fails unless ``infer.split=all``. Rows need the key columns
(``infer.key_columns``, default record_id) and an instruction; rows with a null key are skipped
and duplicate keys keep one row (both counted in the summary).

Each row goes through the ``dolly_generate`` UDF (:mod:`dollyflow.engine.infer`; the model is
loaded once per Python worker, after checking its weights' sha256) and lands in ``predictions``
with its keys, the result fields, ``model`` (the source as configured, credentials redacted),
``model_sha`` (sha256 of the weight files), ``params`` (the generation parameters as JSON) and
``params_sha``, ``model_info`` (``dollyflow_model.json`` when the model has one), ``run_id`` and
``created_at``.

``infer.mode=append`` (default): rows that already have a prediction for the same model_sha and
params_sha are removed *before* generating (an anti-join on the keys), and the new rows are
added by an insert-only merge on (keys, model_sha, params_sha), so re-running adds nothing
twice and a concurrent run cannot duplicate rows. With ``retry_errors`` (default) rows whose
stored prediction is an error are generated again and update the stored row only while it is
still an error (``t.finish_reason = 'error'``), so a concurrent run's error never replaces a good
prediction. ``overwrite`` replaces the rows of this model_sha and params_sha only (every other
model's and parameter set's rows stay), in one commit; a run with no input rows writes and
removes nothing. Generated rows are computed once (persisted) and then written.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

from dollyflow.config import Config, redact, redact_uri
from dollyflow.core.models.files import model_info
from dollyflow.engine.delta import DeltaStore
from dollyflow.engine.infer import generate_udf, load_accumulator, resolve_spec, ship_model, summarize_counts
from dollyflow.engine.query import check_query, run_query
from dollyflow.engine.session import executor_layout, task_count

RESULT_COLUMNS = ["response", "finish_reason", "prompt_tokens", "completion_tokens", "error",
                  "trimmed_context_tokens"]


def say(msg: str) -> None:
    print(f"dollyflow infer: {msg}", file=sys.stderr, flush=True)


def split_version(cfg: Config, store, info: dict | None) -> tuple[int, dict, list[str]]:
    """The version of the tokenized table whose split selects the rows, what the summary says
    about it, and warnings: the version the model was trained from (its provenance), else the
    current one with a warning. A model trained from another tokenized table is an error."""
    t, inf = cfg.tables, cfg.infer
    here = store.location(t.tokenized)
    current = store.version(t.tokenized)
    prov = (info or {}).get("dataset", {}).get("tokenized_table") if isinstance(info, dict) else None
    if not (isinstance(prov, dict) and prov.get("location") and prov.get("version") is not None):
        warning = (f"the model has no training provenance (dollyflow_model.json with dataset.tokenized_table, "
                   f"as the train job writes it), so infer.split={inf.split} uses the current {t.tokenized} "
                   f"table (v{current}): it may hold records the model was trained on")
        return current, {"tokenized_version": current, "tokenized_from": "current (no model provenance)"}, [warning]
    theirs = str(prov["location"])
    if theirs.rstrip("/") != here.rstrip("/"):
        raise RuntimeError(f"the model was trained from the tokenized table {redact_uri(theirs)} (v{prov['version']}), "
                           f"but this job's tokenized table is {here}: its {inf.split} split is not the model's. "
                           "Point tables.* at the model's project, or score every row with infer.split=all")
    version = int(prov["version"])
    if current is not None and version > current:
        raise RuntimeError(f"the model was trained from {here} v{version}, but that table is only at v{current}: "
                           "was it recreated since? Use infer.split=all to score every row")
    return version, {"tokenized_version": version, "tokenized_from": "model provenance",
                     "tokenized_current_version": current}, []


def read_input(cfg: Config, spark, store, info: dict | None = None):
    """The rows to score (a DataFrame), a description of where they came from, and warnings.
    ``info``: the model's provenance (:func:`dollyflow.core.models.files.model_info`)."""
    from pyspark.sql import functions as F

    inf, t = cfg.infer, cfg.tables
    if inf.query.strip():
        views = []
        for name in (t.silver, t.tokenized):
            if store.exists(name):
                views.append(store.view(name))
        return run_query(spark, inf.query, "infer.query"), {"query": redact_uri(inf.query), "views": views}, []
    if not store.exists(inf.input_table):
        raise RuntimeError(f"input table {store.location(inf.input_table)} does not exist")
    df = store.read(inf.input_table)
    source = {"table": inf.input_table, "location": store.location(inf.input_table),
              "version": store.version(inf.input_table), "split": inf.split}
    warnings: list[str] = []
    if inf.split != "all":
        if not store.exists(t.tokenized):
            raise RuntimeError(f"infer.split={inf.split} needs the {t.tokenized} table (run tokenize first), "
                               "or set infer.split=all")
        if "record_id" not in df.columns:
            raise RuntimeError(f"infer.split={inf.split} selects rows by record_id, which {inf.input_table} lacks")
        version, about, warnings = split_version(cfg, store, info)
        try:
            tokenized = store.read(t.tokenized, version)
        except Exception as e:
            raise RuntimeError(f"cannot read {store.location(t.tokenized)} at v{version}, the version the model "
                               f"was trained from ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               "was its history vacuumed? Use infer.split=all to score every row") from None
        ids = tokenized.where(F.col("split") == inf.split).select("record_id")
        df = df.join(ids, "record_id", "left_semi")
        source.update(about)
    return df, source, warnings


def check_columns(df, cfg: Config) -> None:
    inf = cfg.infer
    cols = set(df.columns)
    missing = [k for k in inf.key_columns if k not in cols]
    if missing:
        raise ValueError(f"the input lacks the key column(s) {missing} (infer.key_columns); it has {sorted(cols)}")
    needed = [inf.instruction_column] + ([inf.context_column] if inf.context_column else []) + inf.extra_columns
    absent = [c for c in needed if c not in cols]
    if absent:
        raise ValueError(f"the input lacks the column(s) {absent}; it has {sorted(cols)}")
    clash = set(inf.key_columns + inf.extra_columns) & set(RESULT_COLUMNS + [
        "model", "model_sha", "params", "params_sha", "model_info", "run_id", "created_at"])
    if clash:
        raise ValueError(f"input column(s) {sorted(clash)} clash with predictions columns: rename them")


def _cpu_workers(spark, device: str) -> bool:
    """Whether the UDF's tasks generate on CPUs: ``infer.device=cpu``, or ``auto`` where Spark
    gives the tasks no GPU."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    try:
        return not spark.conf.get("spark.task.resource.gpu.amount", "")
    except Exception:
        return True


def run(cfg: Config, spark) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    t0 = time.time()
    inf, t = cfg.infer, cfg.tables
    if inf.query.strip():
        check_query(spark, inf.query, "infer.query")      # before anything is loaded, let alone run
    store = DeltaStore(spark, cfg.tables)
    spec = ship_model(spark, resolve_spec(inf), t.shared_mounts)   # workers that cannot read it get the driver's copy
    info = model_info(spec.model_dir)
    params_json, params_sha = spec.params_json(), spec.params_sha()
    keys = list(inf.key_columns)
    about = spec.source.describe()
    say(f"model source {about['kind']}: {about['source']}"
        + (f" -> {about['resolved']}" if about["resolved"] != about["source"] else "")
        + f" ({spec.model_dir}), model_sha {spec.digest}")

    df, source, warnings = read_input(cfg, spark, store, info)
    if spec.engine == "ctranslate2" and spec.params.do_sample:
        warnings.append("sampling with CTranslate2: a row's sample depends on what ran before it on its worker "
                        "(CTranslate2 has no per-row seed); per-row seeded samples need infer.engine=torch")
    for w in warnings:
        say(f"warning: {w}")
    check_columns(df, cfg)
    if inf.limit is not None:   # ordered, so every action of this run sees the same rows
        df = df.orderBy(*keys).limit(int(inf.limit))
    cols = keys + [c for c in inf.extra_columns if c not in keys]
    text = [inf.instruction_column] + ([inf.context_column] if inf.context_column else [])
    df = df.select(*cols, *[c for c in text if c not in cols])
    # one pass over the input for its three counts (a query input is not run three times)
    any_null = F.lit(False)
    for k in keys:
        any_null = any_null | F.col(k).isNull()
    c = df.agg(F.count(F.lit(1)).alias("rows"), F.sum(F.when(any_null, 1).otherwise(0)).alias("nulls"),
               F.count_distinct(F.when(~any_null, F.struct(*keys))).alias("unique")).first()
    rows_in, null_keys, rows_unique = int(c["rows"]), int(c["nulls"] or 0), int(c["unique"])
    unique = df.dropna(subset=keys).dropDuplicates(keys)

    existing = 0
    todo = unique
    append = inf.mode == "append" and store.exists(t.predictions)
    if append:
        done = (store.read(t.predictions)
                .where((F.col("model_sha") == spec.digest) & (F.col("params_sha") == params_sha)))
        if inf.retry_errors:
            done = done.where(F.col("finish_reason") != "error")
        todo = unique.join(done.select(*keys).distinct(), keys, "left_anti")
        existing = rows_unique - todo.count()

    n_parts = task_count(spark, inf.partitions)
    if spec.engine == "ctranslate2" and _cpu_workers(spark, spec.device):
        # CTranslate2 on CPUs: one task per executor whose generator runs one single-threaded
        # replica per core over one copy of the weights (a task per core would load a copy per
        # core: measured 0.6x of one process with replicas, bench/README.md)
        executors, cores = executor_layout(spark)
        n_parts = int(inf.partitions) or executors
        if not spec.ct2_threads:
            spec = replace(spec, ct2_threads=cores)
    counts = load_accumulator(spark)
    udf = generate_udf(spec, counts)
    args = [F.col(c) for c in text]
    generated = (todo.repartition(n_parts)
                 .select(*cols, udf(*args).alias("_g"))
                 .select(*cols, *[F.col(f"_g.{c}").alias(c) for c in RESULT_COLUMNS])
                 .withColumn("model", F.lit(spec.source.display))
                 .withColumn("model_sha", F.lit(spec.digest))
                 .withColumn("params", F.lit(params_json))
                 .withColumn("params_sha", F.lit(params_sha))
                 .withColumn("model_info", F.lit(json.dumps(redact(info), sort_keys=True) if info else None)
                             .cast("string"))
                 .withColumn("run_id", F.lit(cfg.run_id))
                 .withColumn("created_at", F.current_timestamp()))

    t_gen = time.time()
    generated = generated.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n_generated = generated.count()    # the generation itself, once
        gen_seconds = time.time() - t_gen
        by_reason = (generated.groupBy("finish_reason")
                     .agg(F.count("*").alias("n"), F.sum("prompt_tokens").alias("p"),
                          F.sum("completion_tokens").alias("c"),
                          F.sum(F.when(F.col("trimmed_context_tokens") > 0, 1).otherwise(0)).alias("t"))
                     .collect())
        stats = {r["finish_reason"]: (int(r["n"]), int(r["p"] or 0), int(r["c"] or 0)) for r in by_reason}
        trimmed = sum(int(r["t"] or 0) for r in by_reason)
        version = store.version(t.predictions)
        scope = {"model_sha": spec.digest, "params_sha": params_sha}
        replaced = 0
        if not n_generated:
            written = (f"no rows to generate: {t.predictions} is unchanged"
                       + (" (overwrite removes nothing when there is no input)" if inf.mode == "overwrite" else ""))
        elif inf.mode == "overwrite":
            if version is not None:
                replaced = (store.read(t.predictions, version)
                            .where((F.col("model_sha") == spec.digest) & (F.col("params_sha") == params_sha)).count())
            version = store.replace_where(generated, t.predictions, scope, job="infer", run_id=cfg.run_id)
            written = (f"overwrite: {n_generated} rows replace the {replaced} rows of this model_sha and params_sha "
                       "(other models' and parameters' rows are kept)")
        else:
            version = store.merge(generated, t.predictions, keys + ["model_sha", "params_sha"], job="infer",
                                  run_id=cfg.run_id, update=inf.retry_errors,
                                  update_when="t.finish_reason = 'error'" if inf.retry_errors else None)
            written = f"append: {version.inserted} rows inserted, {version.updated} stored error rows updated"
    finally:
        generated.unpersist()
    say(written)

    completion = sum(c for _, _, c in stats.values())
    return {
        "job": "infer", "run_id": cfg.run_id, "mode": inf.mode,
        "input": source, "model": spec.source.display, "model_source": about, "model_dir": spec.model_dir,
        "model_sha": spec.digest, "model_info": redact(info), "params": json.loads(params_json),
        "params_sha": params_sha, "engine": spec.engine,
        "compute_type": spec.compute_type if spec.engine != "torch" else None,
        "ct2_threads": spec.ct2_threads if spec.engine != "torch" else None,
        "predictions": store.location(t.predictions), "predictions_version": version,
        "written": written, "replaced_rows": replaced, "warnings": warnings,
        "rows_in": rows_in, "null_keys_skipped": null_keys, "duplicate_keys_dropped": rows_in - null_keys - rows_unique,
        "already_predicted": existing, "generated": n_generated,
        "finish_reasons": {k: v[0] for k, v in sorted(stats.items(), key=lambda kv: str(kv[0]))},
        "context_trimmed_rows": trimmed,
        "prompt_tokens": sum(p for _, p, _ in stats.values()), "completion_tokens": completion,
        "generation_seconds": round(gen_seconds, 3),
        "tokens_per_second": round(completion / gen_seconds, 2) if gen_seconds > 0 and completion else 0.0,
        "partitions": n_parts, "workers": summarize_counts(counts.value if counts is not None else None),
        "job_seconds": round(time.time() - t0, 2),
    }


def skip_reason(cfg: Config) -> str | None:
    """``dollyflow pipeline`` skips scoring when no model is configured."""
    return None if cfg.infer.model else "infer.model is not set (the train job's output directory or an MLflow URI)"
