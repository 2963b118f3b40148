"""The evaluate job end to end (Spark, local[2]): predictions of the tiny Dolly model of conftest
``dolly_model_dir`` under two parameter sets, scored against silver's references into
eval_records, aggregated with bootstrap intervals, compared, and written once."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

pytest.importorskip("torch")
pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

from dollyflow.core.evaluation.metrics import EMPTY_REFERENCE, METRICS, MISSING_PREDICTION  # noqa: E402
from dollyflow.core.models.files import model_digest  # noqa: E402
from dollyflow.core.records import record_id  # noqa: E402

pytestmark = pytest.mark.spark

SILVER_DDL = ("record_id string, instruction string, context string, response string, category string, "
              "source_file string, source_line long, ingested_at timestamp, run_id string")
SHORT, LONG = 4, 24


@pytest.fixture(scope="module")
def project(spark, tmp_path_factory, dolly_records, dolly_model_dir):
    """silver: 40 sample records, one with an empty reference and one whose instruction is null
    (infer's error row); 12 of them test; predictions of the test split with max_new_tokens 4
    (side A, first) and 24 (side B)."""
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import infer

    root = tmp_path_factory.mktemp("evaluate-job")
    base = [f"tables.warehouse={root / 'warehouse'}", "spark.shuffle_partitions=4"]
    infer_base = [*base, f"infer.model={dolly_model_dir}", "infer.window_rows=8"]
    cfg = load_config("infer", infer_base)
    store = DeltaStore(spark, cfg.tables)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = [(record_id(r["instruction"], r["context"], r["response"], r["category"]), r["instruction"],
             r["context"], r["response"], r["category"], "sample", n, now, "test")
            for n, r in enumerate(dolly_records[:40], 1)]
    rows += [("empty-reference", "Name a colour.", "", "  ", "open_qa", "sample", 0, now, "test"),
             ("null-instruction", None, "", "x", "open_qa", "sample", 0, now, "test")]
    store.write(spark.createDataFrame(rows, SILVER_DDL), cfg.tables.silver, mode="overwrite")
    test_ids = [r[0] for r in rows[:10]] + ["empty-reference", "null-instruction"]
    split = [(r[0], "test" if r[0] in test_ids else "train") for r in rows]
    store.write(spark.createDataFrame(split, "record_id string, split string"), cfg.tables.tokenized,
                mode="overwrite")
    short = infer.run(load_config("infer", [*infer_base, f"infer.max_new_tokens={SHORT}"]), spark)
    long = infer.run(load_config("infer", [*infer_base, f"infer.max_new_tokens={LONG}"]), spark)
    return {"base": base, "infer_base": infer_base, "store": store, "rows": rows, "test_ids": test_ids,
            "short": short, "long": long, "model_dir": str(dolly_model_dir)}


def evaluate(spark, project, *overrides):
    from dollyflow.config import load_config
    from dollyflow.jobs import evaluate as job
    return job.run(load_config("evaluate", [*project["base"], *overrides]), spark)


def test_two_parameter_sets_scored_aggregated_compared_and_written_once(spark, project):
    store = project["store"]
    model_dir = project["model_dir"]
    out = evaluate(spark, project, f"evaluate.models=[{model_dir}]", "evaluate.resamples=300")
    sha = model_digest(model_dir)
    # one model, both of its parameter sets: A is the first infer run (4 tokens), B the second
    assert [(s["label"], s["model_sha"], s["params_sha"]) for s in out["sides"]] == [
        ("A", sha, project["short"]["params_sha"]), ("B", sha, project["long"]["params_sha"])]
    assert out["records"] == out["compared"] == 12 and out["not_in_every_model"] == out["not_in_silver"] == 0
    assert out["scored"] == 24 and out["silver_version"] == store.version("silver")

    # a metrics row for every record x side, with its keys, category and finish reason
    table = store.read("eval_records").collect()
    assert len(table) == 24
    assert {(r["record_id"], r["params_sha"]) for r in table} == {
        (rid, s["params_sha"]) for rid in project["test_ids"] for s in out["sides"]}
    silver = {r[0]: r for r in project["rows"]}
    predictions = {(r["record_id"], r["params_sha"]): r for r in store.read("predictions").collect()}
    for r in table:
        assert r["model_sha"] == sha and r["run_id"] == out["run_id"] and r["created_at"] is not None
        assert r["category"] == silver[r["record_id"]][4] and r["silver_version"] == out["silver_version"]
        assert r["finish_reason"] == predictions[r["record_id"], r["params_sha"]]["finish_reason"]
        if r["record_id"] == "empty-reference":        # counted, never scored as a zero
            assert r["reason"] == EMPTY_REFERENCE and all(r[m] is None for m in METRICS)
        elif r["record_id"] == "null-instruction":     # infer's error row: no prediction, zeros
            assert r["reason"] == MISSING_PREDICTION and r["rougeL"] == 0.0 and r["finish_reason"] == "error"
        else:
            assert r["reason"] is None and all(0.0 <= r[m] <= 1.0 for m in METRICS if m != "length_ratio"), str({m: r[m] for m in METRICS})
    assert out["reasons"]["A"][EMPTY_REFERENCE] == out["reasons"]["B"][EMPTY_REFERENCE] == 1
    assert out["unscored_rows"] == {"A": 1, "B": 1}

    # aggregates per category and overall, with intervals around the mean
    for label in ("A", "B"):
        rouge = out["aggregates"][label]["rougeL"]
        assert rouge["overall"]["n"] == 11 and rouge["overall"]["missing"] == 1
        assert rouge["overall"]["low"] <= rouge["overall"]["mean"] <= rouge["overall"]["high"]
        assert set(rouge["by_category"]) == {silver[rid][4] for rid in project["test_ids"]}
    head = out["headline"]
    assert head["closed_qa"]["metric"] == "token_f1" if "closed_qa" in head else True
    assert head["overall"]["metric"] == "headline" and set(head["overall"]["sides"]) == {"A", "B"}
    for cat, h in head.items():
        assert set(h["diff"]) == {"B - A"}, cat

    # the paired comparison sees that 24 tokens answer longer than 4
    length = out["comparisons"]["B - A"]["length_ratio"]["overall"]
    assert length["n"] == 11 and length["diff"] > 0 and length["significant"] and length["p_b_better"] > 0.95

    # one eval_runs row, holding what the summary says
    runs = store.read("eval_runs").collect()
    assert len(runs) == 1 and runs[0]["run_id"] == out["run_id"] and runs[0]["compared"] == 12
    assert runs[0]["eval_records_version"] == out["eval_records_version"]

    # the same inputs again: nothing scored, nothing written to eval_records, the same figures
    version = store.version("eval_records")
    again = evaluate(spark, project, f"evaluate.models=[{model_dir}]", "evaluate.resamples=300")
    assert again["scored"] == 0 and "unchanged" in again["written"]
    assert store.version("eval_records") == version and store.count("eval_records") == 24
    assert again["aggregates"] == out["aggregates"] and again["comparisons"] == out["comparisons"]
    assert store.count("eval_runs") == 2

    from dollyflow.summaries import human_line
    line = human_line("evaluate", again, {"eval_records": [version, version]})
    assert "12 records x 2 model(s)" in line and "B - A" in line and "\n" not in line


def test_default_is_the_newest_infer_run_and_params_sha_narrows(spark, project):
    out = evaluate(spark, project, "evaluate.resamples=50")
    assert [s["params_sha"] for s in out["sides"]] == [project["long"]["params_sha"]]
    assert out["sides"][0]["selector"] == "" and out["comparisons"] == {}
    assert set(out["headline"]["overall"]["sides"]) == {"A"}
    by_sha = evaluate(spark, project, f"evaluate.models=[{project['long']['model_sha'][:10]}]",
                      f"evaluate.params_sha=['{project['short']['params_sha']}']", "evaluate.resamples=50")
    assert [s["params_sha"] for s in by_sha["sides"]] == [project["short"]["params_sha"]]
    assert by_sha["scored"] == 0                        # already in eval_records


def test_a_model_without_predictions_and_no_overlap_fail_clearly(spark, project, tmp_path):
    with pytest.raises(RuntimeError, match=r"no predictions for the model 'deadbeef0123'"):
        evaluate(spark, project, "evaluate.models=[deadbeef0123]")
    with pytest.raises(RuntimeError, match=r"no predictions for the model 'no/such-model'.*Models there"):
        evaluate(spark, project, f"evaluate.models=[{project['model_dir']}, no/such-model]")
    with pytest.raises(RuntimeError, match=r"with evaluate.params_sha in \['0000'\]"):
        evaluate(spark, project, f"evaluate.models=[{project['model_dir']}]", "evaluate.params_sha=['0000']")
    # a third parameter set on two train records only: nothing in common with side A
    from dollyflow.config import load_config
    from dollyflow.jobs import infer
    train_ids = [r[0] for r in project["rows"][20:22]]
    third = infer.run(load_config("infer", [*project["infer_base"], "infer.max_new_tokens=3", "infer.split=all",
                                            "infer.query=SELECT record_id, instruction, context FROM silver "
                                            f"WHERE record_id IN ('{train_ids[0]}', '{train_ids[1]}')"]), spark)
    version = project["store"].version("eval_records")
    with pytest.raises(RuntimeError, match=r"no record to compare: of the 14 records .* 14 lack a prediction"):
        evaluate(spark, project, f"evaluate.models=[{project['model_dir']}]",
                 f"evaluate.params_sha=['{project['short']['params_sha']}', '{third['params_sha']}']")
    assert project["store"].version("eval_records") == version


def test_harness_scores_land_in_eval_runs(spark, project, tmp_path):
    """evaluate.harness_tasks: lm-eval on the sides' model (one model, two parameter sets: run
    once, both sides carry its scores) with a local task file, offline; the scores in eval_runs
    and the summary, eval_records untouched, the settings in the fingerprint."""
    pytest.importorskip("lm_eval")
    import json

    from dollyflow.config import ConfigError
    from dollyflow.testing.harness_task import write_choice_task
    store = project["store"]
    task = write_choice_task(tmp_path, "dolly_choice")
    base = [f"evaluate.models=[{project['model_dir']}]", "evaluate.resamples=50",
            f"evaluate.params_sha=['{project['short']['params_sha']}', '{project['long']['params_sha']}']"]
    evaluate(spark, project, *base)                   # eval_records holds every compared row
    records, runs = store.version("eval_records"), store.count("eval_runs")

    # a bad entry fails before anything is written
    with pytest.raises(ConfigError, match=r"evaluate.harness_tasks: the task file '.*missing.yaml' does not exist"):
        evaluate(spark, project, *base, f"evaluate.harness_tasks=[{tmp_path / 'missing.yaml'}]")
    assert store.count("eval_runs") == runs and store.version("eval_records") == records

    out = evaluate(spark, project, *base, f"evaluate.harness_tasks=[{task}]", "evaluate.harness_limit=4",
                   "evaluate.harness_device=cpu")
    h = out["harness"]
    assert set(h["scores"]) == {"A", "B"} and h["scores"]["A"] == h["scores"]["B"]
    assert list(h["models"]) == [project["short"]["model_sha"]] and h["models"][out["sides"][0]["model_sha"]]["offline"]
    scores = h["scores"]["A"]["dolly_choice"]
    assert scores["samples"] == 4 and 0.0 <= scores["acc"] <= 1.0 and scores["acc"] * 4 == round(scores["acc"] * 4)
    assert h["parameters"] == {"tasks": [str(task)], "limit": 4, "seed": 42,
                               "lm_eval_version": h["models"][project["short"]["model_sha"]]["lm_eval_version"]}
    assert out["scored"] == 0 and store.version("eval_records") == records      # eval_records unaffected
    row = [r for r in store.read("eval_runs").collect() if r["run_id"] == out["run_id"]]
    assert len(row) == 1 and json.loads(row[0]["harness"]) == h["scores"]
    assert json.loads(row[0]["parameters"])["harness"] == h["parameters"]
    assert row[0]["fingerprint"] == out["fingerprint"]

    from dollyflow.summaries import human_line
    assert f"harness dolly_choice acc A {scores['acc']:,.4g}, B {scores['acc']:,.4g}" in human_line("evaluate", out, {})

    plain = evaluate(spark, project, *base)
    assert plain["harness"] is None and "harness" not in plain["parameters"]
    assert plain["fingerprint"] != out["fingerprint"] and plain["aggregates"] == out["aggregates"]
    assert [r["harness"] for r in store.read("eval_runs").collect() if r["run_id"] == plain["run_id"]] == [None]
