"""``dollyflow pipeline`` end to end on the sample with the tiny preset (ingest -> dedupe -> filter ->
tokenize -> train -> infer of the untrained base and of the fine-tune -> evaluate of base against
fine-tune on local Spark, then the run report), a rerun with the same inputs, and ``dollyflow
report`` rebuilding the first run's report from the versions it recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dollyflow.cli import main
from dollyflow.report.html import SECTIONS
from dollyflow.summaries import ALL_TABLES, JOB_TABLES

pytestmark = [pytest.mark.spark, pytest.mark.slow]

DATA_TABLES = [t for tables in JOB_TABLES.values() for t in tables]


def contents(spark, warehouse: Path) -> dict:
    """Every data table's rows (all columns but write timestamps), sorted: its content."""
    store = _store(spark, warehouse)
    out = {}
    for name in DATA_TABLES:
        df = store.read(name)
        cols = sorted(c for c in df.columns if c not in ("ingested_at", "created_at"))
        out[name] = sorted(tuple(str(r[c]) for c in cols) for r in df.select(*cols).collect())
    return out


def test_pipeline_end_to_end_rerun_and_report(spark, tmp_path, capsys, sample_path, tokenizer_path):
    wh = tmp_path / "wh"
    # the sample plus a line that is not JSON (quarantined) and a case-changed copy of the first
    # record (an exact duplicate after normalisation), so every table gets rows
    lines = sample_path.read_text(encoding="utf-8").splitlines()
    copy = json.loads(lines[0])
    copy["instruction"] = copy["instruction"].upper()
    data_file = tmp_path / "input.jsonl"
    # and, for the filter, a one-word poem (removed: empty_response) and an email in a context (redacted)
    poem = {"instruction": "Write a poem about the moon.", "context": "", "response": "Moon",
            "category": "creative_writing"}
    mail = {"instruction": "Who answers questions about the trip?", "category": "closed_qa",
            "context": "Questions about the trip go to lena.berg@example.com until Monday.",
            "response": "Lena answers questions about the trip by email until Monday."}
    data_file.write_text("\n".join(lines + ['{"instruction": "broken', json.dumps(copy), json.dumps(poem),
                                            json.dumps(mail)]) + "\n", encoding="utf-8")
    args = ["pipeline", "--preset", "tiny", "--json", f"tables.warehouse={wh}", f"ingest.input={data_file}",
            f"model.tokenizer={tokenizer_path}", "tokenize.test_size=0.1", "evaluate.baseline=base",
            "spark.conf={spark.hadoop.fs.s3a.secret.key: TOPSECRET}"]    # where people put secrets
    assert main(args) == 0
    out = capsys.readouterr()
    first = json.loads(out.out)                       # --json: stdout is one JSON document
    # issue 18: no secret in anything written or printed (run record, report, model dir, MLflow)
    assert "TOPSECRET" not in out.out + out.err and first["config"]["spark"]["conf"] == {
        "spark.hadoop.fs.s3a.secret.key": "***"}
    for p in wh.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".html", ".yaml", ".txt", ".md", ".jsonl", ""):
            assert b"TOPSECRET" not in p.read_bytes(), p
    assert "[6/7] infer" in out.err and "[7/7] evaluate" in out.err and "report" in out.err   # the progress lines went to stderr
    assert "[6/7] infer (base) done" in out.err and out.err.index("infer (base) done") < out.err.index("[6/7] infer    done")
    assert first["status"] == "succeeded" and not first["unchanged"]
    assert list(first["jobs"]) == ["ingest", "dedupe", "filter", "tokenize", "train", "infer (base)", "infer",
                                   "evaluate"]
    assert [j["status"] for j in first["jobs"].values()] == ["changed"] * 8
    for name in ALL_TABLES:                           # every table exists and has rows
        assert first["tables"][name]["version"] is not None, name
    data = contents(spark, wh)
    assert all(data[t] for t in DATA_TABLES), {t: len(v) for t, v in data.items()}
    assert first["jobs"]["ingest"]["summary"]["rows_quarantined"] == 1
    assert first["jobs"]["dedupe"]["summary"]["removed_exact"] == 1
    filtered = first["jobs"]["filter"]["summary"]
    assert filtered["removed"]["quality"]["empty_response"] >= 1 and filtered["redactions"]["email"] >= 1
    assert filtered["rows_in"] == filtered["rows_kept"] + filtered["rows_removed"]
    assert "Filtered and redacted" in Path(first["report"]).read_text(encoding="utf-8")
    # infer scored exactly the test split into predictions, with the model train just wrote
    store = _store(spark, wh)
    test_ids = {r["record_id"] for r in store.read("tokenized").where("split = 'test'").select("record_id").collect()}
    pred = first["jobs"]["infer"]["summary"]
    assert pred["model"] == first["jobs"]["train"]["summary"]["output_dir"]
    assert pred["generated"] == len(test_ids) > 0
    assert {r["record_id"] for r in store.read("predictions").select("record_id").collect()} == test_ids
    # evaluate.baseline=base: the untrained base the fine-tune started from scored the same rows first,
    # with the same generation parameters; evaluate compared it (A) with the fine-tune (B)
    base = first["jobs"]["infer (base)"]["summary"]
    assert base["base"]["model"] == "tiny-gpt-neox" and Path(base["model"]).name.startswith("tiny-gpt-neox-base-")
    assert Path(base["model"]).parent == Path(pred["model"]).parent and base["model_info"]["kind"] == "base"
    assert base["generated"] == pred["generated"] and base["params_sha"] == pred["params_sha"]
    assert base["model_sha"] != pred["model_sha"] and base["input"]["tokenized_version"] == pred["input"]["tokenized_version"]
    assert store.count("predictions") == 2 * len(test_ids)
    ev = first["jobs"]["evaluate"]["summary"]
    assert [(s["label"], s["model_sha"]) for s in ev["sides"]] == [("A", base["model_sha"]), ("B", pred["model_sha"])]
    assert ev["compared"] == len(test_ids) and list(ev["comparisons"]) == ["B - A"]
    assert Path(first["jobs"]["infer (base)"]["log"]).name == "infer-base.log"
    # the human summaries (without --json) are one line per job, no JSON
    for name in JOB_TABLES:
        assert f"] {name}" in out.err
    assert "{" not in "".join(line for line in out.err.splitlines() if line.startswith("["))

    report = Path(first["report"])
    html = report.read_text(encoding="utf-8")
    assert report.parent == wh / "reports"
    for key, title in SECTIONS:
        assert f'<h2 id="{key}">{title}</h2>' in html
    # categories, quarantine, duplicates, lengths, loss, per-category loss, finish reasons, the
    # evaluation's headline per category and, two sides (base A, fine-tune B), their difference
    assert html.count('<img alt="') == 9 and "data:image/png;base64," in html
    assert "Best and worst answers per category" in html and "id='tiny-model'" in html     # the tiny preset
    evaluated = first["jobs"]["evaluate"]["summary"]
    assert evaluated["mlflow"]["runs"][0]["run_id"] == first["jobs"]["train"]["summary"]["mlflow_run_id"]
    assert copy["instruction"] in html                # the duplicate pair is shown
    assert first["jobs"]["train"]["summary"]["mlflow_run_id"] in html
    assert Path(first["jobs"]["train"]["log"]).is_file()  # the job's own output, kept beside the record

    # rerun with the same inputs: no data table's content changes, and the pipeline says so
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert contents(spark, wh) == data
    status = {n: j["status"] for n, j in second["jobs"].items()}
    assert status["ingest"] == status["dedupe"] == status["filter"] == status["infer"] == status["evaluate"] == "unchanged", \
        status
    assert status["infer (base)"] == "unchanged" and second["jobs"]["infer (base)"]["summary"]["base"]["reused"]
    assert second["jobs"]["evaluate"]["summary"]["sides"] == ev["sides"]
    for name in ("ingest", "dedupe", "infer", "infer (base)"):
        assert all(a == b for a, b in second["jobs"][name]["changes"].values())
    if "skipped" in second["jobs"]["tokenize"]["summary"]:   # the tokenize job with skip_unchanged
        assert status["tokenize"] == status["train"] == "unchanged" and second["unchanged"], status

    # the report of the first run, rebuilt later: the versions that run recorded, not the latest
    rebuilt = tmp_path / "rebuilt.html"
    assert main(["report", "--run-id", first["run_id"], f"tables.warehouse={wh}", "--out", str(rebuilt)]) == 0
    assert first["run_id"] in capsys.readouterr().out
    assert rebuilt.read_text(encoding="utf-8") == html
    assert main(["report", "--run-id", "no-such-run", f"tables.warehouse={wh}"]) == 2
    assert "no pipeline run 'no-such-run'" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"{not json\n[1]\n"], ids=["empty", "all-quarantined"])
def test_pipeline_stops_at_the_first_failing_job_and_names_it(spark, tmp_path, capsys, tokenizer_path, content):
    """An input with no valid record fails ingest (after recording it); the pipeline says which
    job failed and why, runs none of the later jobs and exits non-zero."""
    wh = tmp_path / "wh"
    data_file = tmp_path / "input.jsonl"
    data_file.write_bytes(content)
    args = ["pipeline", "--preset", "tiny", f"tables.warehouse={wh}", f"ingest.input={data_file}",
            f"model.tokenizer={tokenizer_path}", "tokenize.test_size=0.1"]
    assert main(args) == 1
    out = capsys.readouterr()
    assert "[1/7] ingest   FAILED" in out.out and "NoRecordsError" in out.out and str(data_file) in out.out
    assert "failed in ingest (job 1 of 7): NoRecordsError" in out.err
    assert "not run: dedupe, filter, tokenize, train, infer, evaluate" in out.err
    assert "[2/7]" not in out.out
    (run_dir,) = (wh / "pipeline_runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["failed_job"], list(record["jobs"])) == ("failed", "ingest", ["ingest"])
    assert record["not_run"] == ["dedupe", "filter", "tokenize", "train", "infer", "evaluate"]
    assert record["jobs"]["ingest"]["summary"]["lines_read"] == content.count(b"\n")
    store = _store(spark, wh)
    assert store.version("silver") is None and store.version("tokenized") is None
    assert store.count("ingest_runs") == 1


def _store(spark, wh: Path):
    from dollyflow.config import TablesConfig
    from dollyflow.engine.delta import DeltaStore
    return DeltaStore(spark, TablesConfig(warehouse=str(wh)))


def test_pipeline_and_its_rerun_on_native_delta(native_spark, tmp_path, capsys, sample_path, tokenizer_path):
    """The same pipeline on the native backend (Delta Lake in the JVM, its jars resolved by the
    session): every job changes its tables, the rerun changes none (no new version anywhere)."""
    wh = tmp_path / "wh"
    args = ["pipeline", "--preset", "tiny", "--json", f"tables.warehouse={wh}", f"ingest.input={sample_path}",
            f"model.tokenizer={tokenizer_path}", "tokenize.test_size=0.1", "tables.backend=native"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["status"] == "succeeded" and list(first["jobs"]) == ["ingest", "dedupe", "filter", "tokenize", "train",
                                                                      "infer", "evaluate"]
    assert [j["status"] for j in first["jobs"].values()] == ["changed"] * 7
    for name, job in first["jobs"].items():
        if "backend" in job["summary"]:
            assert job["summary"]["backend"] == "native", (name, job["summary"].get("backend_reason"))
    store = _store(native_spark, wh)
    assert store.native
    versions = {name: store.version(name) for name in ALL_TABLES}
    assert all(v is not None for v in versions.values()), versions
    data = contents(native_spark, wh)
    assert all(data[t] for t in DATA_TABLES if t not in ("quarantine", "duplicates", "filtered"))
    assert store.count("predictions") == first["jobs"]["infer"]["summary"]["generated"] > 0

    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    status = {n: j["status"] for n, j in second["jobs"].items()}
    assert (status["ingest"] == status["dedupe"] == status["filter"] == status["infer"] == status["evaluate"]
            == "unchanged"), status
    assert contents(native_spark, wh) == data
    unchanged = [job for job, st in status.items() if st == "unchanged"]
    assert {"ingest", "dedupe", "filter", "infer", "evaluate"} <= set(unchanged)
    for job in unchanged:                       # an unchanged job committed no new version
        for name in JOB_TABLES[job]:
            assert store.version(name) == versions[name], (job, name)
