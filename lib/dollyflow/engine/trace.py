"""The Spark half of ``dollyflow trace``: read what every stage recorded about one record (or
behind one model) from the project's Delta tables, through :class:`DeltaStore`.

Forward (:func:`trace_record`), for a record id or a ``source_file:line``:

- ingest: ``bronze`` (the record's first line: file, line, ingest run) or ``quarantine`` (a
  rejected line: reason, detail, raw). A valid line that repeats a record ingest already had is
  stored nowhere; its file is read again (:func:`line_record`) to name the record it holds;
- dedupe: ``duplicates`` (removed: of which survivor, kind, similarity) or ``silver`` (kept, with
  the records removed as its duplicates), and the ``dedupe_runs`` row that wrote silver's version;
- filter: ``filtered`` (removed: stage, reason, detail, span) or ``curated`` (kept, with its
  ``redactions``), or "no filter run" when neither table exists;
- tokenize: ``tokenized`` (split), the ``tokenize_runs`` row of that version (shard directory) and
  the shard file holding the record (its ``record_id`` column, read from the shard directory);
- train: every ``train_runs`` model whose shard directory's tokenized version (``tokenize_runs``)
  holds the record, with its split, train run and MLflow run;
- infer and evaluate: its ``predictions`` and ``eval_records`` rows.

Reverse (:func:`trace_model`): a model directory's provenance (``dollyflow_model.json``) names the
tokenized version and the source table version it was trained from; the records of each split are
joined to that version's ``source_file``/``source_line`` and compressed into line ranges, and the
near copies dedupe removed in favour of a trained record are listed beside them.

Every table is read only where it exists; each read is a filter on one record id (or a join at one
version for a model), and only the matching rows come back to the driver.
"""
from __future__ import annotations

import json
from datetime import date, datetime

from pyspark.sql import functions as F

from dollyflow.config import Config
from dollyflow.core.evaluation.metrics import METRICS
from dollyflow.core.records import Rules
from dollyflow.core.shards.manifest import read_manifest
from dollyflow.core.storage import filesystem
from dollyflow.core.trace import Target, TraceError, line_ranges, shard_dir_exists, shard_file_of, source_spellings
from dollyflow.core.training.model_dir import read_provenance
from dollyflow.engine.delta import DeltaStore
from dollyflow.engine.ingest import list_inputs, parse_chunk, plan_chunks, rules_of

#: Tables of the filter job (issue 25), named here in case the config does not name them.
FILTER_TABLES = ("curated", "filtered")
#: Rows of one kind shown at most (predictions, duplicates of a survivor ...).
MAX_ROWS = 1000


def _plain(v):
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    return v


def _rows(df, limit: int = MAX_ROWS) -> list[dict]:
    return [{k: _plain(v) for k, v in r.asDict().items()} for r in df.limit(limit).collect()]


class Tables:
    """The project's tables by logical name, each read only when it exists (versions cached)."""

    def __init__(self, spark, cfg: Config):
        self.store = DeltaStore(spark, cfg.tables)
        self.cfg = cfg
        self._versions: dict[str, int | None] = {}

    def name(self, key: str) -> str:
        return getattr(self.cfg.tables, key, key)

    def version(self, key: str) -> int | None:
        if key not in self._versions:
            self._versions[key] = self.store.version(self.name(key))
        return self._versions[key]

    def read(self, key: str, version: int | None = None):
        """The table at ``version`` (default: current), or None when it does not exist."""
        if self.version(key) is None:
            return None
        return self.store.read(self.name(key), version if version is not None else self.version(key))

    def rows(self, key: str, where, version: int | None = None, columns: list[str] | None = None) -> list[dict]:
        df = self.read(key, version)
        if df is None:
            return []
        df = df.where(where)
        if columns:
            df = df.select(*[c for c in columns if c in df.columns])
        return _rows(df)


# ---------------------------------------------------------------------------------------------
# forward


def line_record(cfg: Config, spellings: list[str], line: int) -> tuple[str | None, str | None]:
    """(record id, file) of line ``line`` of the first of ``spellings`` that exists, parsed with
    ingest's own reader and rules; (None, None) when no such file, (None, file) when the line is
    not a valid record or the file is shorter."""
    rules: Rules = rules_of(cfg.ingest)
    for spelling in spellings:
        try:
            fs, path = filesystem(spelling)
            if fs.get_file_info(path).type.name != "File":
                continue
            inputs = list_inputs(spelling, cfg.ingest.format)
        except (OSError, ValueError):
            continue
        chunks = plan_chunks(inputs.files[:1], 1 << 62)
        for c in chunks:
            c["first_line"] = c["first_line"] or 1
            for batch in parse_chunk(c, rules, 0):
                lines = batch.column("source_line").to_pylist()
                if line in lines:
                    return batch.column("record_id")[lines.index(line)].as_py(), spelling
        return None, spelling
    return None, None


def _ingest(tb: Tables, target: Target) -> dict:
    out: dict = {"query": target.text, "record_id": target.record_id, "raw": None, "quarantine": []}
    cols = ["record_id", "source_file", "source_line", "run_id", "ingested_at"]
    if target.record_id is None:
        spellings = source_spellings(target.file)
        at = (F.col("source_file").isin(spellings)) & (F.col("source_line") == target.line)
        found = tb.rows("bronze", at, columns=cols)
        out["quarantine"] = [dict(q, ingest_run_id=q.pop("run_id")) for q in tb.rows(
            "quarantine", at, columns=["source_file", "source_line", "reason", "detail", "raw", "run_id",
                                       "ingested_at"])]
        if found:
            out["record_id"] = found[0]["record_id"]
        elif not out["quarantine"]:
            rid, path = line_record(tb.cfg, spellings, target.line)
            if rid is None:
                where = f"; {path} has no valid record at line {target.line}" if path else \
                    "; the file is not readable from here"
                raise TraceError(f"no line {target.text} in {tb.store.location(tb.name('bronze'))} or "
                                 f"{tb.store.location(tb.name('quarantine'))} (looked for source_file "
                                 f"{' or '.join(spellings)}, line {target.line}){where}")
            out["record_id"] = rid
            out["repeat_of_pending"] = True
        if out["record_id"] is None:
            return out
    rid = out["record_id"]
    found = tb.rows("bronze", F.col("record_id") == rid, columns=cols)
    if not found:
        raise TraceError(f"unknown record id {rid}: not in {tb.store.location(tb.name('bronze'))}"
                         + (" (bronze does not exist: run ingest first)" if tb.version("bronze") is None else ""))
    b = found[0]
    out["raw"] = {"source_file": b["source_file"], "source_line": b["source_line"],
                  "ingest_run_id": b["run_id"], "ingested_at": b["ingested_at"]}
    if out.pop("repeat_of_pending", False):
        out["repeat_of"] = out["raw"]
    return out


def _latest(rows: list[dict], key: str = "finished_at") -> dict | None:
    return max(rows, key=lambda r: str(r.get(key) or "")) if rows else None


def _dedupe(tb: Tables, rid: str) -> dict:
    sv = tb.version("silver")
    if sv is None:
        return {"status": "not deduplicated: no silver table (run dedupe)"}
    run = _latest(tb.rows("dedupe_runs", F.col("silver_version") == sv, columns=["run_id", "finished_at"]))
    base = {"silver_version": sv, "dedupe_run_id": run["run_id"] if run else None}
    dup = tb.rows("duplicates", F.col("record_id") == rid,
                  columns=["record_id", "cluster_id", "survivor_id", "kind", "similarity"])
    if dup:
        d = dup[0]
        surv = tb.rows("bronze", F.col("record_id") == d["survivor_id"], columns=["source_file", "source_line"])
        return {**base, "status": "duplicate", "duplicate_of": d["survivor_id"], "cluster_id": d["cluster_id"],
                "kind": d["kind"], "similarity": d["similarity"], "survivor_source": surv[0] if surv else None}
    if tb.rows("silver", F.col("record_id") == rid, columns=["record_id"]):
        dups = tb.rows("duplicates", F.col("survivor_id") == rid, columns=["record_id", "kind", "similarity"])
        return {**base, "status": "survivor", "duplicates": sorted(dups, key=lambda x: x["record_id"])}
    return {**base, "status": f"not deduplicated yet: in neither silver v{sv} nor duplicates (ingested after the "
                               "last dedupe run)"}


def _redactions(value) -> object:
    if value is None:
        return None
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _filter(tb: Tables, rid: str, dedupe: dict) -> dict:
    if all(tb.version(k) is None for k in FILTER_TABLES):
        return {"status": "no filter run"}
    removed = tb.rows("filtered", F.col("record_id") == rid,
                      columns=["stage", "reason", "detail", "span", "filter_run_id", "silver_version"])
    if removed:
        return {"status": "removed", "removed": removed, "filter_run_id": removed[0].get("filter_run_id"),
                "silver_version": removed[0].get("silver_version")}
    kept = tb.rows("curated", F.col("record_id") == rid, columns=["redactions", "filter_run_id"])
    if kept:
        red = _redactions(kept[0].get("redactions"))
        return {"status": "redacted" if red else "kept", "redactions": red or [],
                "filter_run_id": kept[0].get("filter_run_id")}
    if dedupe["status"] == "duplicate":
        return {"status": "not filtered: removed by dedupe before the filter"}
    return {"status": "not filtered yet: in neither curated nor filtered (the filter has not run on the silver "
                      "version that holds it)"}


def _tokenize(tb: Tables, rid: str) -> dict:
    tv = tb.version("tokenized")
    if tv is None:
        return {"status": "not tokenized: no tokenized table (run tokenize)"}
    got = tb.rows("tokenized", F.col("record_id") == rid, columns=["split"])
    if not got:
        return {"status": f"not in tokenized v{tv}: removed before tokenize, dropped by it (longer than "
                          "max_length) or not tokenized yet", "tokenized_version": tv}
    run = _latest(tb.rows("tokenize_runs", F.col("tokenized_version") == tv,
                          columns=["run_id", "shard_dir", "finished_at"]))
    out = {"status": "tokenized", "split": got[0]["split"], "tokenized_version": tv,
           "tokenize_run_id": run["run_id"] if run else None, "shard_dir": run["shard_dir"] if run else None,
           "shard_file": None}
    if run and shard_dir_exists(run["shard_dir"]):
        out["shard_file"] = shard_file_of(run["shard_dir"], rid, got[0]["split"])
    else:
        out["shard_note"] = "(shard directory pruned or unknown)"
    return out


def _models(tb: Tables, rid: str) -> list[dict]:
    runs = tb.rows("train_runs", F.lit(True), columns=[
        "run_id", "started_at", "decision", "shard_dir", "manifest_sha256", "output_dir", "mlflow_run_id",
        "fingerprint", "skipped"])
    if not runs:
        return []
    shard_versions = {str(r["shard_dir"]).rstrip("/"): r["tokenized_version"] for r in sorted(
        tb.rows("tokenize_runs", F.lit(True), columns=["shard_dir", "tokenized_version", "finished_at"]),
        key=lambda r: str(r["finished_at"]))}
    models: dict[tuple, dict] = {}
    for r in sorted(runs, key=lambda r: (bool(r.get("skipped")), str(r["started_at"]))):
        models.setdefault((r["output_dir"], r["fingerprint"]), r)   # the run that trained it, else a skip
    splits: dict[int, str | None] = {}
    out = []
    for (output_dir, fingerprint), r in sorted(models.items(), key=lambda kv: str(kv[1]["started_at"])):
        version = shard_versions.get(str(r["shard_dir"]).rstrip("/"))
        if version is None and shard_dir_exists(r["shard_dir"]):      # shards made by another project's run
            version = (read_manifest(r["shard_dir"]).get("tokenized_table") or {}).get("version")
        if version is None:
            continue
        if version not in splits:
            got = tb.rows("tokenized", F.col("record_id") == rid, version=int(version), columns=["split"])
            splits[version] = got[0]["split"] if got else None
        if splits[version] is None:
            continue
        prov = read_provenance(output_dir) if output_dir else None
        out.append({"model_dir": output_dir, "split": splits[version], "train_run_id": r["run_id"],
                    "mlflow_run_id": r.get("mlflow_run_id"), "shard_dir": r["shard_dir"],
                    "manifest_sha256": r["manifest_sha256"], "tokenized_version": int(version),
                    "fingerprint": fingerprint,
                    "model_present": bool(prov) and (prov.get("fingerprint") or {}).get("sha256") == fingerprint})
    return out


def _predictions(tb: Tables, rid: str) -> list[dict]:
    df = tb.read("predictions")
    if df is None or "record_id" not in df.columns:
        return []
    cols = ["model", "model_sha", "params_sha", "run_id", "finish_reason", "response", "error", "created_at"]
    return sorted(tb.rows("predictions", F.col("record_id") == rid, columns=cols),
                  key=lambda r: str(r.get("created_at")))


def _evaluations(tb: Tables, rid: str) -> list[dict]:
    cols = ["model", "model_sha", "params_sha", "silver_version", "run_id", "reason", "judge_verdict",
            "created_at", *METRICS]
    out = []
    for r in tb.rows("eval_records", F.col("record_id") == rid, columns=cols):
        r["metrics"] = {m: r.pop(m) for m in METRICS if m in r}
        out.append(r)
    return sorted(out, key=lambda r: str(r.get("created_at")))


def trace_record(spark, cfg: Config, target: Target) -> dict:
    """Everything the tables record about one record (see the module doc); TraceError when the
    record id or line is unknown."""
    tb = Tables(spark, cfg)
    out = _ingest(tb, target)
    rid = out["record_id"]
    if rid is None:             # a quarantined line: nothing downstream
        return out
    out["dedupe"] = _dedupe(tb, rid)
    out["filter"] = _filter(tb, rid, out["dedupe"])
    out["tokenize"] = _tokenize(tb, rid)
    out["models"] = _models(tb, rid)
    out["predictions"] = _predictions(tb, rid)
    out["evaluations"] = _evaluations(tb, rid)
    return out


# ---------------------------------------------------------------------------------------------
# reverse


def _files(rows) -> list[dict]:
    return [{"source_file": r["source_file"], "lines": len(set(r["lines"])), "ranges": line_ranges(r["lines"])}
            for r in sorted(rows, key=lambda r: r["source_file"])]


def _same(a: str | None, b: str) -> bool:
    return str(a or "").rstrip("/") == b.rstrip("/")


def trace_model(spark, cfg: Config, model_dir: str) -> dict:
    """The raw files and line ranges behind the model in ``model_dir``: per split of the
    tokenized version it was trained from, the source lines of its records (and the near copies
    dedupe removed in favour of a trained record)."""
    prov = read_provenance(model_dir)
    if prov is None:
        raise TraceError(f"{model_dir} holds no dollyflow model: no dollyflow_model.json (the train job writes it "
                         "when a model is finished)")
    if prov.get("trained") is False:
        raise TraceError(f"{model_dir} is an untrained base model ({prov.get('base_model')}): this project trained it "
                         "on nothing")
    ds = prov.get("dataset") or {}
    tok, source = ds.get("tokenized_table") or {}, ds.get("source") or {}
    if tok.get("version") is None or source.get("version") is None:
        raise TraceError(f"{model_dir}: its provenance names no tokenized table version or source version "
                         "(dataset.tokenized_table, dataset.source): it was not trained from this project's tables")
    tb = Tables(spark, cfg)
    src_name = source.get("table") or tb.name("silver")
    for name, loc in ((tb.name("tokenized"), tok.get("location")), (src_name, source.get("location"))):
        if not _same(loc, tb.store.location(name)):
            raise TraceError(f"{model_dir} was trained from {loc}, but this project's {name} table is "
                             f"{tb.store.location(name)}: point tables.* at the model's project")
    tokenized = tb.store.read(tb.name("tokenized"), int(tok["version"])).select("record_id", "split")
    src = tb.store.read(src_name, int(source["version"])).select("record_id", "source_file", "source_line")
    joined = tokenized.join(src, "record_id", "left")
    per_file = joined.where(F.col("source_file").isNotNull()).groupBy("split", "source_file").agg(
        F.collect_list("source_line").alias("lines")).collect()
    counts = {r["split"]: (int(r["n"]), int(r["unlocated"])) for r in joined.groupBy("split").agg(
        F.count(F.lit(1)).alias("n"), F.sum(F.when(F.col("source_file").isNull(), 1).otherwise(0)).alias(
            "unlocated")).collect()}
    splits = {}
    for split, (n, unlocated) in sorted(counts.items()):
        splits[split] = {"records": n, "unlocated": unlocated,
                         "files": _files([r for r in per_file if r["split"] == split])}
    out = {"model_dir": model_dir, "train_run_id": prov.get("run_id"), "mlflow_run_id": prov.get("mlflow_run_id"),
           "shard_dir": ds.get("shard_dir"), "manifest_sha256": ds.get("manifest_sha256"),
           "tokenized_version": int(tok["version"]),
           "source": {"table": src_name, "location": source.get("location"), "version": int(source["version"])},
           "splits": splits, "duplicates": _near_copies(tb, tokenized, src_name, int(source["version"]))}
    return out


def _near_copies(tb: Tables, tokenized, src_name: str, src_version: int) -> dict | None:
    """The records dedupe removed as duplicates of a trained record, with their lines: the
    duplicates version of the dedupe run that wrote the source version (silver), else the
    newest one."""
    runs = tb.rows("dedupe_runs", F.lit(True), columns=["silver_version", "duplicates_version", "finished_at"])
    if not runs or tb.version("bronze") is None:
        return None
    match = [r for r in runs if src_name == tb.name("silver") and r["silver_version"] == src_version]
    run = _latest(match or runs)
    dups = tb.store.read(tb.name("duplicates"), int(run["duplicates_version"])).select("record_id", "survivor_id")
    trained = tokenized.where(F.col("split") == "train").select(F.col("record_id").alias("survivor_id"))
    removed = dups.join(trained, "survivor_id", "left_semi").select("record_id")
    lines = removed.join(tb.read("bronze").select("record_id", "source_file", "source_line"), "record_id")
    rows = lines.groupBy("source_file").agg(F.collect_list("source_line").alias("lines")).collect()
    return {"duplicates_version": int(run["duplicates_version"]), "records": removed.count(), "files": _files(rows)}
