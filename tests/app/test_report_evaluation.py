"""The run report's evaluation section, the tiny-model warning and the wrapping of long unbroken
text (report/html.py, core/plots.py), on figures from the real aggregation
(:func:`dollyflow.core.evaluation.compare.summarize`) of planted per-record values."""
from __future__ import annotations

import html as html_lib
import re

import numpy as np
import pytest

from dollyflow.core import plots
from dollyflow.core.evaluation.compare import summarize
from dollyflow.core.evaluation.headline import explain
from dollyflow.core.evaluation.metrics import METRICS
from dollyflow.report import html as report
from dollyflow.report.evaluation import CLIP, ELLIPSIS, clip

from test_report import PNG, synthetic  # noqa: E402 - beside this file

UNBROKEN = ",." * 1000            # the tiny model's favourite answer: 2,000 characters, no break


def evaluation(sides=("A", "B"), judge=None) -> dict:
    """An evaluation of 60 records in three categories where B is planted better on closed_qa
    (+0.3) and equal elsewhere."""
    rng = np.random.default_rng(7)
    cats = ["closed_qa"] * 30 + ["summarization"] * 15 + ["open_qa"] * 15
    base = {m: rng.uniform(0, 0.6, len(cats)) for m in METRICS}
    values = {}
    for s in sides:
        v = {m: base[m].copy() for m in METRICS}
        if s == "B":
            v["token_f1"][:30] += 0.3
        values[s] = v
    r = summarize(list(sides), cats, values, seed=3, resamples=300)
    side_dicts = [{"label": s, "model": f"/models/{s.lower()}", "model_sha": s * 64, "params_sha": f"p{s}",
                   "params": '{"max_new_tokens": 64}', "rows": 60, "selector": ""} for s in sides]
    examples = [{"category": "closed_qa", "kind": kind, "record_id": f"r-{kind}", "metric": "token_f1",
                 "value": value, "instruction": clip("Who wrote <Hamlet>?"), "context": clip("A play. " * 100),
                 "reference": "Shakespeare",
                 "predictions": [{"label": s, "response": clip(text if s == sides[-1] else "William Shakespeare"),
                                  "finish_reason": "stop", "value": value, "reason": None, "found": True}
                                 for s in sides]}
                for kind, value, text in (("best", 1.0, "Shakespeare"), ("worst", 0.0, UNBROKEN))]
    return {"ran": True, "status": "changed", "source": "/w/dollyflow/eval_runs v0", "run_id": "pipeline-x-evaluate",
            "silver_version": 2, "predictions_version": 3, "eval_records_version": 0, "records": 60, "compared": 60,
            "scored": 120, "not_in_every_model": 0, "not_in_silver": 0, "fingerprint": "f" * 16,
            "reasons": {s: {} for s in sides}, "finish_reasons": {s: {"stop": 50, "length": 10} for s in sides},
            "parameters": {"seed": 3, "resamples": 300, "level": 0.95, "judge": judge},
            "sides": side_dicts, "headline": r["headline"], "aggregates": r["aggregates"],
            "comparisons": r["comparisons"], "judge": None, "judged": bool(judge),
            "headline_note": explain(["closed_qa", "open_qa", "summarization"], judged=bool(judge)),
            "mlflow": {"runs": [{"run_id": "abc123", "tracking_uri": "file:/w/mlruns", "status": "logged",
                                 "metrics": 80}]},
            "clip": CLIP, "examples": examples, "examples_note": None}


def test_the_section_draws_both_sides_the_difference_and_the_examples():
    d = synthetic()
    d["evaluate"] = evaluation()
    page = report.render_html(d)
    assert '<h2 id="evaluation">Evaluation</h2>' in page
    # the earlier seven plots, then the headline per category and the difference B - A
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', page)) == 9
    assert 'alt="paired difference B - A per category"' in page
    # the planted difference is called on closed_qa, the equal categories are not
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td>([a-z_]+)</td>.*?</tr>", page)}
    assert "B better" in rows["closed_qa"]
    assert "no clear difference" in rows["summarization"] and "no clear difference" in rows["open_qa"]
    assert "token F1" in rows["closed_qa"] and "ROUGE-L" in rows["summarization"]
    # the headline note says which metric headlines which category, and that no judge ran
    assert "<b>closed_qa</b>: token F1" in page and "no judge was run" in page
    # best and worst, every side beside the reference, escaped; the clip is said
    assert "Who wrote &lt;Hamlet&gt;?" in page and "<Hamlet>" not in page
    assert page.count("William Shakespeare") == 2 and f"cut at {CLIP} characters" in page
    assert "run <code>abc123</code>" in page


def test_one_side_draws_no_difference():
    d = synthetic()
    d["evaluate"] = evaluation(sides=("A",))
    page = report.render_html(d)
    assert "paired difference" not in page and "better" not in page
    assert len(re.findall(r"<img ", page)) == 8


def test_a_run_without_evaluation_says_so():
    d = synthetic()
    d["evaluate"] = {"ran": False, "reason": "evaluate skipped: no predictions to evaluate"}
    page = report.render_html(d)
    assert "evaluation did not run in this pipeline run: evaluate skipped: no predictions" in page
    del d["evaluate"]
    assert "evaluation did not run in this pipeline run" in report.render_html(d)


def test_judge_win_rates_are_shown_when_present():
    d = synthetic()
    ev = evaluation(judge={"model": "/models/judge"})
    iv = {"mean": 0.6, "low": 0.5, "high": 0.7, "n": 40, "missing": 0}
    rates = {"n": 10, "unparseable": 0, "win": iv, "tie": iv, "loss": iv, "score": iv}
    ev["judge"] = {"B": {"overall": {**rates, "n": 40, "unparseable": 3}, "by_category": {"open_qa": rates},
                         "judged": 43, "not_judged": 0}}
    d["evaluate"] = ev
    page = report.render_html(d)
    assert "<h3>Judge</h3>" in page and "<td class=\"pre\">B / open_qa</td>" in page
    assert "<td class=\"pre\">B / overall</td>" in page and "0.600 [0.500, 0.700]" in page
    assert "judge score" in page      # the judged categories' headline


def test_long_unbroken_text_wraps_inside_its_cell():
    """A 2,000-character ``,.,.,.`` generation (the sample generations and the examples) is
    escaped inside an element whose CSS wraps it, and the page's style has the rule."""
    d = synthetic()
    d["infer"]["samples"][0]["response"] = UNBROKEN
    d["evaluate"] = evaluation()
    page = report.render_html(d)
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    rule = re.search(r"td,th,pre,code,p,li,h1\{([^}]*)\}", style)
    assert rule and "overflow-wrap:anywhere" in rule.group(1) and "word-break:break-word" in rule.group(1)
    gen = re.search(r"\.gen\{([^}]*)\}", style).group(1)
    assert "white-space:pre-wrap" in gen and "overflow-wrap:anywhere" in gen
    # the sample generations: clipped, inside a wrapping cell
    assert re.search(r'<td class="pre">(,\.){150} \.\.\.</td>', page)
    # the examples: clipped with an ellipsis, inside a .gen cell
    cut = UNBROKEN[:CLIP] + ELLIPSIS
    assert f"<td class='gen'>{html_lib.escape(cut)}<div class='label'>" in page
    assert UNBROKEN[:CLIP + 2] not in page


def test_the_tiny_preset_says_its_answers_mean_nothing():
    d = synthetic()                      # preset tiny
    page = report.render_html(d)
    box = re.search(r"<div class='warn' id='tiny-model'>(.*?)</div>", page, re.S).group(1)
    assert "not meaningful" in box and "--preset pythia-1.4b" in box and "GPU" in box
    d["run"]["preset"] = "pythia-1.4b"
    assert "id='tiny-model'" not in report.render_html(d)
    d["run"]["model"] = "tiny-gpt-neox"     # the tiny model under another preset
    assert "id='tiny-model'" in report.render_html(d)


def test_evaluation_plots_are_pngs_and_draw_labels_literally():
    ev = evaluation()
    head = ev["headline"]
    head["$x_1$"] = head.pop("open_qa")       # a category from the data, drawn as text
    for png in (plots.plot_headline(head, ["A", "B"]), plots.plot_differences(head, "B - A"),
                plots.plot_headline(evaluation(sides=("A",))["headline"], ["A"])):
        assert png.startswith(PNG) and len(png) > 2000


def test_clip():
    assert clip(None) is None and clip("short") == "short"
    assert clip("x" * (CLIP + 1)) == "x" * CLIP + ELLIPSIS and len(clip("y" * 5000)) == CLIP + 1


# --- the evaluation part of the report from real tables (Spark) ---------------------------------

A_SHA, B_SHA = "a0" * 32, "b0" * 32
QA = [("Who wrote Hamlet?", "Hamlet is a tragedy by William Shakespeare.", "William Shakespeare"),
      ("What colour is the sky on a clear day?", "", "The sky is blue"),
      ("Name the capital of France.", "Paris is the capital of France.", "Paris"),
      ("How many legs has a spider?", "Spiders have eight legs.", "Eight legs")]
SUMS = [("Summarize the text.", "Delta Lake stores tables as Parquet files and a transaction log.",
         "Delta Lake keeps Parquet files plus a transaction log"),
        ("Summarize the text.", "Spark runs jobs on a cluster of executors coordinated by a driver.",
         "A driver coordinates executors that run Spark jobs")]


def planted() -> tuple[list[tuple], dict, dict]:
    """silver with four closed_qa, two summarization and two brainstorming records; side A (the
    base) answers vaguely, side B (the fine-tune) exactly on Hamlet, with ``,.,.`` on the sky,
    partly elsewhere, and nonsense on both brainstorming records."""
    from dollyflow.testing.evaluation import silver_rows
    records = [{"instruction": i, "context": c, "response": r, "category": "closed_qa"} for i, c, r in QA]
    records += [{"instruction": i, "context": c, "response": r, "category": "summarization"} for i, c, r in SUMS]
    records += [{"instruction": f"Suggest a name for a {pet}.", "context": "", "response": name,
                 "category": "brainstorming"} for pet, name in (("cat", "Whiskers"), ("dog", "Rex"))]
    silver = silver_rows(records)
    ids = [r[0] for r in silver]
    a = {rid: "I am not sure about that." for rid in ids}
    b = {ids[0]: "William Shakespeare", ids[1]: UNBROKEN, ids[2]: "It is Paris, France", ids[3]: "Eight",
         ids[4]: "Delta Lake keeps a transaction log", ids[5]: "Executors run jobs", ids[6]: "qqq", ids[7]: "qqq"}
    return silver, a, b


@pytest.mark.spark
@pytest.mark.slow
def test_collect_reads_the_evaluation_at_the_run_versions(spark, tmp_path):
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import evaluate as job
    from dollyflow.report.gather import collect
    from dollyflow.summaries import ALL_TABLES
    from dollyflow.testing.evaluation import prediction_rows, write_tables

    base = [f"tables.warehouse={tmp_path / 'warehouse'}", "spark.shuffle_partitions=2"]
    cfg = load_config("evaluate", [*base, f"evaluate.models=[{A_SHA[:12]}, {B_SHA[:12]}]", "evaluate.resamples=200"])
    store = DeltaStore(spark, cfg.tables)
    silver, a, b = planted()
    write_tables(spark, store, cfg.tables, silver,
                 prediction_rows(a, model="/models/base", model_sha=A_SHA, params_sha="pa")
                 + prediction_rows(b, model="/models/ft", model_sha=B_SHA, params_sha="pb", minute=1))
    cfg.run_id = "pipeline-t-evaluate"
    out = job.run(cfg, spark)
    assert out["mlflow"] is None and "no compared model has an MLflow run" in out["mlflow_skipped"]
    record = {"run_id": "pipeline-t", "preset": "tiny", "files_root": str(tmp_path), "config": cfg.redacted(),
              "jobs": {"evaluate": {"status": "changed", "seconds": 1.0, "summary": out}},
              "tables": {n: {"version": store.version(n), "location": store.location(n)} for n in ALL_TABLES}}

    def check(data: dict) -> dict:
        ev = data["evaluate"]
        assert ev["ran"] and ev["source"] == f"{store.location('eval_runs')} v{record['tables']['eval_runs']['version']}"
        assert [s["label"] for s in ev["sides"]] == ["A", "B"] and ev["compared"] == 8
        assert ev["headline"] == out["headline"] and ev["aggregates"] == out["aggregates"]
        assert ev["judge"] is None and not ev["judged"] and "token F1" in ev["headline_note"]
        ex = {(x["category"], x["kind"]): x for x in ev["examples"]}
        assert set(ex) == {("closed_qa", "best"), ("closed_qa", "worst"), ("summarization", "best"),
                           ("summarization", "worst"), ("brainstorming", "all equal")}   # both score 0
        best, worst = ex["closed_qa", "best"], ex["closed_qa", "worst"]
        assert best["metric"] == "token_f1" and best["value"] == 1.0 and best["instruction"] == QA[0][0]
        assert best["reference"] == "William Shakespeare" and best["context"] == QA[0][1]
        assert [(p["label"], p["response"], p["value"]) for p in best["predictions"]] == [
            ("A", "I am not sure about that.", 0.0), ("B", "William Shakespeare", 1.0)]
        assert worst["value"] == 0.0 and worst["instruction"] == QA[1][0]
        assert worst["predictions"][1]["response"] == UNBROKEN[:CLIP] + ELLIPSIS
        assert worst["predictions"][1]["finish_reason"] == "length"
        assert ex["summarization", "best"]["metric"] == "rougeL"
        assert ex["summarization", "best"]["value"] > ex["summarization", "worst"]["value"]
        return ev

    check(collect(spark, record))

    # later: the predictions replaced, silver changed, another evaluation appended; the report of
    # this run still shows what its evaluation saw
    silver2 = [(r[0], "CHANGED " + r[1], *r[2:]) for r in silver]
    write_tables(spark, store, cfg.tables, silver2,
                 prediction_rows({rid: "other" for rid in a}, model="/models/base", model_sha=A_SHA, params_sha="pa")
                 + prediction_rows({rid: "other" for rid in b}, model="/models/ft", model_sha=B_SHA, params_sha="pb",
                                   minute=1))
    cfg2 = load_config("evaluate", [*base, f"evaluate.models=[{B_SHA[:12]}]", "evaluate.resamples=50"])
    cfg2.run_id = "pipeline-t-evaluate"        # the same run id again: the recorded version decides
    job.run(cfg2, spark)
    check(collect(spark, record))
    page = report.render_html(collect(spark, record))
    assert "id='tiny-model'" in page and '<h2 id="evaluation">Evaluation</h2>' in page
    assert "CHANGED" not in page and "William Shakespeare" in page


@pytest.mark.spark
def test_a_run_without_evaluate_has_no_evaluation(spark, tmp_path):
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.report.gather import collect

    cfg = load_config("evaluate", [f"tables.warehouse={tmp_path / 'warehouse'}"])
    record = {"run_id": "p", "config": cfg.redacted(),
              "jobs": {"evaluate": {"status": "skipped", "summary": {"skipped": "no predictions to evaluate"}}},
              "tables": {"eval_runs": {"version": None, "location": DeltaStore(spark, cfg.tables).location("eval_runs")}}}
    assert collect(spark, record)["evaluate"] == {"ran": False, "reason": "evaluate skipped: no predictions to evaluate"}
    del record["jobs"]["evaluate"]
    assert not collect(spark, record)["evaluate"]["ran"]
