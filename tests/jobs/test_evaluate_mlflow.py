"""The evaluate job logs its figures to the MLflow run of each compared model the train job
tracked (a file store in tmp_path), once per evaluation, and a tracking failure never fails it."""
from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

pytestmark = [pytest.mark.spark, pytest.mark.slow]

A_SHA, B_SHA, C_SHA = "a1" * 32, "b1" * 32, "c1" * 32
RECORDS = [
    {"instruction": "Who wrote Hamlet?", "context": "Hamlet is a play by William Shakespeare.",
     "response": "William Shakespeare", "category": "closed_qa"},
    {"instruction": "Name the capital of France.", "context": "", "response": "Paris", "category": "closed_qa"},
    {"instruction": "How many legs has a spider?", "context": "", "response": "Eight legs", "category": "closed_qa"},
    {"instruction": "Summarize.", "context": "Spark runs jobs on executors coordinated by a driver.",
     "response": "A driver coordinates executors", "category": "summarization"},
    {"instruction": "Summarize.", "context": "Delta Lake keeps Parquet files and a transaction log.",
     "response": "Parquet files plus a log", "category": "summarization"},
    {"instruction": "Suggest a name for a cat.", "context": "", "response": "Whiskers", "category": "brainstorming"},
]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(spark, tmp_path_factory):
    """silver; side A (an untracked base), B (trained with MLflow run ``run_id`` on a file store),
    C (its provenance names a tracking server nobody listens on); the train run already finished."""
    from mlflow.tracking import MlflowClient

    from dollyflow.config import load_config
    from dollyflow.core.training import tracking
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.testing.evaluation import prediction_rows, silver_rows, write_tables

    root = tmp_path_factory.mktemp("evaluate-mlflow")
    uri = f"file:{root / 'mlruns'}"
    run_id = tracking.start_run(uri, "dollyflow", "train-fixture", {"train": {"epochs": 1}}, {"fixture": "yes"})
    MlflowClient(tracking_uri=uri).set_terminated(run_id, status="FINISHED")
    base = [f"tables.warehouse={root / 'warehouse'}", "spark.shuffle_partitions=2", "evaluate.resamples=200"]
    cfg = load_config("evaluate", base)
    store = DeltaStore(spark, cfg.tables)
    silver = silver_rows(RECORDS)
    ids = [r[0] for r in silver]
    a = {rid: "I do not know" for rid in ids}
    b = {rid: r["response"] if n % 2 == 0 else r["response"].split()[0] for n, (rid, r) in enumerate(zip(ids, RECORDS))}
    c = {rid: "Something" for rid in ids}
    write_tables(spark, store, cfg.tables, silver,
                 prediction_rows(a, model="/models/base", model_sha=A_SHA, params_sha="pa")
                 + prediction_rows(b, model="/models/ft", model_sha=B_SHA, params_sha="pb", minute=1,
                                   info={"name": "ft", "mlflow_run_id": run_id, "mlflow_tracking_uri": uri})
                 + prediction_rows(c, model="/models/elsewhere", model_sha=C_SHA, params_sha="pc", minute=2,
                                   info={"mlflow_run_id": "0" * 32,
                                         "mlflow_tracking_uri": f"http://127.0.0.1:{_closed_port()}"}))
    return {"base": base, "uri": uri, "run_id": run_id, "store": store}


def evaluate(spark, project, *overrides):
    from dollyflow.config import load_config
    from dollyflow.jobs import evaluate as job
    return job.run(load_config("evaluate", [*project["base"], *overrides]), spark)


def test_the_figures_land_in_the_trained_models_run_once(spark, project, tmp_path):
    from mlflow.tracking import MlflowClient

    out = evaluate(spark, project, f"evaluate.models=[{A_SHA[:10]}, {B_SHA[:10]}]")
    assert out["mlflow_skipped"] is None
    [entry] = out["mlflow"]["runs"]
    assert entry["run_id"] == project["run_id"] and entry["sides"] == ["B"] and entry["status"] == "logged"
    assert entry["artifacts"] == ["evaluation.json"] and entry["metrics"] > 0

    client = MlflowClient(tracking_uri=project["uri"])
    run = client.get_run(project["run_id"])
    m, head = run.data.metrics, out["headline"]
    for side in ("A", "B"):
        for cat, metric in (("closed_qa", "token_f1"), ("summarization", "rougeL"), ("brainstorming", "rougeL"),
                            ("overall", "headline")):
            iv = head[cat]["sides"][side]
            key = f"eval/{side}/{cat}/{metric}"
            assert m[key] == pytest.approx(iv["mean"]), key
            assert m[key + "_lo"] == pytest.approx(iv["low"]) and m[key + "_hi"] == pytest.approx(iv["high"])
        assert m[f"eval/{side}/overall/chrf"] == pytest.approx(out["aggregates"][side]["chrf"]["overall"]["mean"])
    diff = head["closed_qa"]["diff"]["B - A"]
    assert m["eval/B-A/closed_qa/token_f1"] == pytest.approx(diff["diff"]) and diff["diff"] > 0
    assert m["eval/B-A/closed_qa/token_f1_lo"] == pytest.approx(diff["low"])
    assert run.data.tags["dollyflow.evaluate.fingerprint"] == out["fingerprint"]
    assert run.data.tags["dollyflow.evaluate.this_model"] == "B"
    assert run.info.status == "FINISHED"                   # the training run stays finished
    path = client.download_artifacts(project["run_id"], "evaluation.json", str(tmp_path))
    doc = json.loads(open(path, encoding="utf-8").read())
    assert doc["fingerprint"] == out["fingerprint"] and doc["headline"] == out["headline"]
    assert [s["label"] for s in doc["sides"]] == ["A", "B"]

    # the same evaluation again: the run already holds it, nothing is logged twice
    again = evaluate(spark, project, f"evaluate.models=[{A_SHA[:10]}, {B_SHA[:10]}]")
    assert again["fingerprint"] == out["fingerprint"] and again["mlflow"]["runs"][0]["status"] == "already logged"
    assert len(client.get_metric_history(project["run_id"], "eval/B/closed_qa/token_f1")) == 1

    from dollyflow.summaries import human_line
    assert f"MLflow run {project['run_id']} already logged" in human_line("evaluate", again)


def test_no_run_or_mlflow_off_is_said_not_failed(spark, project):
    out = evaluate(spark, project, f"evaluate.models=[{A_SHA[:10]}]")
    assert out["mlflow"] is None and "no compared model has an MLflow run" in out["mlflow_skipped"]
    off = evaluate(spark, project, f"evaluate.models=[{A_SHA[:10]}, {B_SHA[:10]}]", "evaluate.mlflow=false")
    assert off["mlflow"] is None and off["mlflow_skipped"] == "evaluate.mlflow=false"


def test_an_unreachable_tracking_server_does_not_fail_the_job(spark, project, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    store = project["store"]
    runs_before = store.count("eval_runs") if store.exists("eval_runs") else 0
    out = evaluate(spark, project, f"evaluate.models=[{A_SHA[:10]}, {C_SHA[:10]}]")
    [entry] = out["mlflow"]["runs"]
    assert entry["status"] == "failed" and entry["sides"] == ["B"] and entry["error"]
    assert entry["tracking_uri"].startswith("http://127.0.0.1:")
    assert store.count("eval_runs") == runs_before + 1      # the evaluation itself is committed
    assert out["eval_runs_version"] == store.version("eval_runs")
