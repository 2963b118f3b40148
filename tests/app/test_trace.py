"""``dollyflow trace`` on a real pipeline's tables (ingest -> dedupe -> tokenize -> train -> infer ->
evaluate with the tiny preset, once per module): a record forward by id and by
``source_file:line`` (absolute, relative, ``file://``), a quarantined line, a duplicate, a line
that repeats an earlier record, the filter stage with ``curated``/``filtered`` tables and without,
a model backward to its raw lines, and the clear errors (exit 2)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dollyflow.cli import main
from dollyflow.core.trace import TraceError, format_ranges, line_ranges, parse_target, source_spellings


# ---------------------------------------------------------------------------------------------
# engine-free parts


def test_targets_spellings_and_ranges(tmp_path, monkeypatch):
    rid = "0123456789abcdef0123456789ABCDEF"
    assert parse_target(rid).record_id == rid.lower()
    t = parse_target("data/in.jsonl:12")
    assert (t.file, t.line, t.record_id) == ("data/in.jsonl", 12, None)
    assert parse_target("s3://b/x.jsonl:3").file == "s3://b/x.jsonl"
    for bad in ("", "in.jsonl", "in.jsonl:0", "in.jsonl:x", "abc"):
        with pytest.raises(TraceError, match="record id"):
            parse_target(bad)
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "in.jsonl")
    assert source_spellings("in.jsonl") == [absolute, f"file://{absolute}"]
    assert source_spellings(f"file://{absolute}") == [absolute, f"file://{absolute}"]
    assert source_spellings("s3a://b/in.jsonl") == ["s3a://b/in.jsonl", "s3://b/in.jsonl"]
    assert line_ranges([5, 1, 2, 3, 9, 3, 10]) == [[1, 3], [5, 5], [9, 10]]
    assert format_ranges(line_ranges([1, 2, 3, 5, 9, 10])) == "1-3, 5, 9-10" and line_ranges([]) == []


# ---------------------------------------------------------------------------------------------
# on the pipeline's tables

RECORDS = 40


@pytest.fixture(scope="module")
def project(spark, tmp_path_factory, sample_path, tokenizer_path):
    """A pipeline run over 40 sample records plus a broken line (43), a case-changed copy of line
    1 (44: an exact duplicate) and line 2 again (45: the same record, not stored again)."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("trace")
    lines = sample_path.read_text(encoding="utf-8").splitlines()[:RECORDS]
    copy = json.loads(lines[0])
    copy["instruction"] = copy["instruction"].upper()
    lines += ["", '{"instruction": "broken', json.dumps(copy), lines[1]]       # 41 blank, 42 broken
    data = root / "input.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    wh = root / "wh"
    base = [f"tables.warehouse={wh}"]
    args = ["pipeline", "--preset", "tiny", "--json", "--no-report", *base, f"ingest.input={data}",
            f"model.tokenizer={tokenizer_path}", "tokenize.test_size=0.2", "train.epochs=1",
            "infer.max_new_tokens=4", "evaluate.baseline=none"]
    assert main(args) == 0
    return {"root": root, "data": data, "lines": lines, "base": base, "wh": wh}


def _store(spark, project):
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore
    return DeltaStore(spark, load_config("trace", project["base"]).tables)


def _run(capsys, project, *args) -> tuple[int, str, str]:
    code = main(["trace", *args, *project["base"]])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys, project, *args) -> dict:
    code, out, err = _run(capsys, project, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def _filter_ran(store) -> bool:
    """Whether the pipeline ran the filter job (once it is a pipeline step): its tables exist."""
    return store.exists("curated") or store.exists("filtered")


def _record_of(line: str) -> str:
    from dollyflow.core.records import record_id
    r = json.loads(line)
    return record_id(r["instruction"], r["context"], r["response"], r["category"])


def _run_row(store, table: str) -> dict:
    return store.read(table).orderBy("finished_at", ascending=False).limit(1).collect()[0].asDict()


@pytest.mark.spark
@pytest.mark.slow
def test_forward_by_id_and_by_line(spark, project, capsys, monkeypatch):
    store = _store(spark, project)
    split = {r["record_id"]: r["split"] for r in store.read("tokenized").collect()}
    train_run, tok_run = _run_row(store, "train_runs"), _run_row(store, "tokenize_runs")
    ingest_run = _run_row(store, "ingest_runs")["run_id"]
    # a test-split record: predicted and evaluated
    n = next(i for i, line in enumerate(project["lines"][:RECORDS], 1) if split.get(_record_of(line)) == "test")
    rid = _record_of(project["lines"][n - 1])
    t = _json(capsys, project, rid)
    assert t["record_id"] == rid and t["quarantine"] == []
    assert t["raw"]["source_file"] == str(project["data"]) and t["raw"]["source_line"] == n
    assert t["raw"]["ingest_run_id"] == ingest_run
    assert t["dedupe"]["status"] == "survivor" and t["dedupe"]["silver_version"] == store.version("silver")
    assert t["dedupe"]["dedupe_run_id"] == _run_row(store, "dedupe_runs")["run_id"]
    if _filter_ran(store):          # the record reached the test split, so the filter kept it
        assert t["filter"]["status"] in ("kept", "redacted") and t["filter"]["filter_run_id"]
    else:
        assert t["filter"] == {"status": "no filter run"}
    tk = t["tokenize"]
    assert tk["split"] == "test" and tk["tokenize_run_id"] == tok_run["run_id"] and tk["shard_dir"] == tok_run["shard_dir"]
    import pyarrow.parquet as pq
    assert rid in pq.read_table(Path(tk["shard_dir"]) / tk["shard_file"], columns=["record_id"]).column(
        "record_id").to_pylist()
    [m] = t["models"]
    assert m["model_dir"] == train_run["output_dir"] and m["split"] == "test" and m["model_present"]
    assert m["train_run_id"] == train_run["run_id"] and m["mlflow_run_id"] == train_run["mlflow_run_id"]
    [p] = t["predictions"]
    stored = store.read("predictions").where(f"record_id = '{rid}'").collect()[0]
    assert p["model"] == train_run["output_dir"] and (p["run_id"], p["model_sha"]) == (stored["run_id"], stored["model_sha"])
    [e] = t["evaluations"]
    assert e["model_sha"] == p["model_sha"] and e["params_sha"] == p["params_sha"] and "rougeL" in e["metrics"]
    code, text, _ = _run(capsys, project, rid)
    assert code == 0
    for part in (f"raw line     {project['data']}:{n}", "kept in silver",
                 "filter       kept" if _filter_ran(store) else "filter       no filter run",
                 f"split test, shard {tk['shard_file']}", f"model        {train_run['output_dir']}: test split",
                 f"prediction   {train_run['output_dir']}", "evaluation   "):
        assert part in text, (part, text)

    # a train-split record by its line: absolute, relative to the working directory, file:// URI
    n = next(i for i, line in enumerate(project["lines"][:RECORDS], 1) if split.get(_record_of(line)) == "train")
    rid = _record_of(project["lines"][n - 1])
    monkeypatch.chdir(project["root"])
    for spelled in (str(project["data"]), "input.jsonl", f"file://{project['data']}"):
        t = _json(capsys, project, f"{spelled}:{n}")
        assert t["record_id"] == rid and t["raw"]["source_line"] == n, spelled
        assert [m["split"] for m in t["models"]] == ["train"] and t["tokenize"]["split"] == "train"
        assert t["predictions"] == [] and t["evaluations"] == []


@pytest.mark.spark
@pytest.mark.slow
def test_quarantine_duplicate_repeat_and_unknown(spark, project, capsys):
    data, lines = project["data"], project["lines"]
    t = _json(capsys, project, f"{data}:42")
    assert t["record_id"] is None and [q["reason"] for q in t["quarantine"]] == ["malformed_json"]
    assert t["quarantine"][0]["raw"].startswith('{"instruction": "broken')
    code, text, _ = _run(capsys, project, f"{data}:42")
    assert code == 0 and "quarantined  " in text and "malformed_json" in text
    # line 1 and its case-changed copy (line 43): an exact pair; dedupe kept one (same ingest time: the
    # smaller record id) and removed the other as its duplicate
    pair = {1: _json(capsys, project, f"{data}:1"), 43: _json(capsys, project, f"{data}:43")}
    assert pair[43]["record_id"] == _record_of(lines[42]) and pair[1]["record_id"] == _record_of(lines[0])
    [(gone, t)] = [(n, p) for n, p in pair.items() if p["dedupe"]["status"] == "duplicate"]
    kept = 1 if gone == 43 else 43
    d = t["dedupe"]
    assert (d["kind"], d["duplicate_of"], d["similarity"]) == ("exact", pair[kept]["record_id"], 1.0)
    assert d["survivor_source"] == {"source_file": str(data), "source_line": kept}
    assert t["models"] == [] and t["tokenize"]["status"].startswith("not in tokenized")
    assert t["filter"]["status"] == ("not filtered: removed by dedupe before the filter"
                                     if _filter_ran(_store(spark, project)) else "no filter run")
    assert t["predictions"] == []
    assert pair[kept]["dedupe"]["status"] == "survivor"
    assert [x["record_id"] for x in pair[kept]["dedupe"]["duplicates"]] == [t["record_id"]]
    code, text, _ = _run(capsys, project, f"{data}:{gone}")
    assert code == 0 and f"removed: exact duplicate of {pair[kept]['record_id']}" in text
    # line 44 repeats line 2: the same record, stored once, from line 2
    t = _json(capsys, project, f"{data}:44")
    assert t["record_id"] == _record_of(lines[1]) and t["repeat_of"]["source_line"] == 2
    assert t["raw"]["source_line"] == 2
    # unknown: exit 2 with the reason
    code, out, err = _run(capsys, project, "f" * 32)
    assert code == 2 and out == "" and f"unknown record id {'f' * 32}" in err
    assert [q["reason"] for q in _json(capsys, project, f"{data}:41")["quarantine"]] == ["blank_line"]
    code, _, err = _run(capsys, project, f"{data}:999")
    assert code == 2 and f"no line {data}:999" in err and "has no valid record at line 999" in err
    code, _, err = _run(capsys, project, "elsewhere.jsonl:1")
    assert code == 2 and "not readable from here" in err
    code, _, err = _run(capsys, project, "not-a-target")
    assert code == 2 and "record id (32 hex digits" in err


@pytest.mark.spark
@pytest.mark.slow
def test_model_backward_to_raw_lines(spark, project, capsys, tmp_path):
    store = _store(spark, project)
    train_run = _run_row(store, "train_runs")
    t = _json(capsys, project, "--model", train_run["output_dir"])
    assert t["train_run_id"] == train_run["run_id"] and t["mlflow_run_id"] == train_run["mlflow_run_id"]
    assert t["source"]["table"] == ("curated" if _filter_ran(store) else "silver")
    assert t["tokenized_version"] == store.version("tokenized")
    tokenized = {r["record_id"]: r["split"] for r in store.read("tokenized").collect()}
    line_of: dict = {}
    for i, line in enumerate(project["lines"], 1):
        try:
            line_of.setdefault(_record_of(line), i)     # a record's first line (line 44 repeats line 2)
        except ValueError:
            pass                                        # the blank and the broken line
    for split in ("train", "test"):
        s = t["splits"][split]
        want = sorted({line_of[r] for r, sp in tokenized.items() if sp == split})
        [f] = s["files"]
        assert f["source_file"] == str(project["data"]) and s["records"] == len(want) == f["lines"]
        assert f["ranges"] == line_ranges(want) and s["unlocated"] == 0
    # of line 1 and its copy (line 43) one was removed by dedupe; it reached the model through the
    # other when that one was trained on
    [gone] = [r["record_id"] for r in store.read("duplicates").collect()]
    kept = ({_record_of(project["lines"][0]), _record_of(project["lines"][42])} - {gone}).pop()
    trained = tokenized.get(kept) == "train"
    assert t["duplicates"]["records"] == (1 if trained else 0)
    if trained:
        assert t["duplicates"]["files"] == [{"source_file": str(project["data"]), "lines": 1,
                                             "ranges": [[line_of[gone]] * 2]}]
    code, text, _ = _run(capsys, project, "--model", train_run["output_dir"])
    assert code == 0 and f"trained by run {train_run['run_id']}" in text
    assert f"{project['data']}: lines {format_ranges(t['splits']['train']['files'][0]['ranges'])}" in text
    code, _, err = _run(capsys, project, "--model", str(tmp_path))
    assert code == 2 and "holds no dollyflow model" in err


@pytest.mark.spark
@pytest.mark.slow
def test_filter_stage_from_curated_and_filtered(spark, project, capsys):
    """The filter job's tables, with exactly its columns: ``curated`` (silver's columns +
    ``redactions`` JSON + ``filter_run_id``) and ``filtered`` (record_id, stage, reason, detail,
    span, filter_run_id, silver_version)."""
    from pyspark.sql import functions as F
    store = _store(spark, project)
    for name in ("curated", "filtered"):    # a pipeline with the filter step made its own: replaced here
        if store.exists(name):
            store.drop(name)
    silver = store.read("silver")
    ids = sorted(r["record_id"] for r in silver.select("record_id").collect())
    removed, redacted = ids[0], ids[1]
    redactions = json.dumps([{"field": "context", "kind": "EMAIL", "placeholder": "<EMAIL>", "start": 4, "end": 21}])
    curated = (silver.where(F.col("record_id") != removed)
               .withColumn("redactions", F.when(F.col("record_id") == redacted, F.lit(redactions))
                           .otherwise(F.lit("[]")))
               .withColumn("filter_run_id", F.lit("filter-run-1")))
    filtered = spark.createDataFrame(
        [(removed, "pii", "phone", "phone number in response (action drop)", "+1 415 555 0100", "filter-run-1",
          store.version("silver"))],
        "record_id string, stage string, reason string, detail string, span string, filter_run_id string, "
        "silver_version long")
    store.write(curated, "curated", mode="overwrite")
    store.write(filtered, "filtered", mode="overwrite")
    try:
        t = _json(capsys, project, removed)["filter"]
        assert t["status"] == "removed" and t["filter_run_id"] == "filter-run-1"
        assert t["removed"] == [{"stage": "pii", "reason": "phone", "detail": "phone number in response (action drop)",
                                 "span": "+1 415 555 0100", "filter_run_id": "filter-run-1",
                                 "silver_version": store.version("silver")}]
        t = _json(capsys, project, redacted)["filter"]
        assert t["status"] == "redacted" and t["redactions"] == json.loads(redactions)
        assert _json(capsys, project, ids[2])["filter"] == {"status": "kept", "redactions": [],
                                                            "filter_run_id": "filter-run-1"}
        code, text, _ = _run(capsys, project, removed)
        assert code == 0 and "filter       removed at stage pii: phone" in text and "+1 415 555 0100" in text
        _, text, _ = _run(capsys, project, redacted)
        assert "filter       kept, redacted: " in text and "<EMAIL>" in text
    finally:
        store.drop("curated")
        store.drop("filtered")
    assert _json(capsys, project, removed)["filter"] == {"status": "no filter run"}
    assert not os.path.exists(store.location("curated"))
