"""The run report's plots (core/plots.py) and HTML (report/html.py), and the pipeline's human
summary lines, on synthetic data."""
from __future__ import annotations

import re

import pytest

from dollyflow.core import plots
from dollyflow.report import html as report
from dollyflow.summaries import human_line, job_status

PNG = b"\x89PNG\r\n\x1a\n"


def synthetic() -> dict:
    metrics = [{"kind": "train", "step": s, "loss": 10 - s * 0.1} for s in range(1, 61)]
    metrics += [{"kind": "eval", "step": s, "eval_loss": 9.5 - s * 0.05,
                 "eval_loss_per_category": {"open_qa": {"loss": 7.1, "records": 3},
                                            "closed_qa": {"loss": 6.9, "records": 2}}} for s in (20, 40, 60)]
    return {
        "run": {"run_id": "pipeline-x", "status": "succeeded", "seconds": 61.5, "preset": "tiny", "env": "local",
                "unchanged": True},
        "jobs": {"ingest": {"status": "unchanged", "seconds": 3.2}, "train": {"status": "unchanged", "seconds": 1.0}},
        "categories": {"open_qa": {"bronze": 30, "silver": 28}, "closed_qa": {"bronze": 10, "silver": 10}},
        "quarantine": {"invalid_json": 2, "empty_response": 1},
        "quarantine_examples": [{"reason": "invalid_json", "where": "a.jsonl:3", "detail": "Expecting value"}],
        "duplicates": {"exact": 1, "near": 1},
        "duplicate_examples": [{"kind": "near", "similarity": 0.81, "record_id": "r2", "survivor_id": "r1",
                                "instruction": "What is <b>Spark</b>?", "response": "An engine.",
                                "survivor_instruction": "What is Spark?", "survivor_response": "An engine"}],
        "tokens": {"max_length": 512, "drops": {"too_long": 4}, "shard_dir": "/w/shards/v0", "manifest_sha256": "ab" * 32,
                   "splits": {"train": {"width": 16, "bins": {"2": 5, "3": 9, "10": 1}, "records": 15, "tokens": 900},
                              "test": {"width": 16, "bins": {"3": 2}, "records": 2, "tokens": 100}}},
        "train": {"output_dir": "/w/models/m", "steps": 60, "train_loss": 4.0, "eval_loss": 6.5, "decision": "skip",
                  "metrics": metrics, "mlflow": {"run_id": "abc123", "experiment": "dollyflow", "tracking_uri": "file:/w"}},
        "infer": {"model": "/w/models/m", "rows_in": 2, "generated": 2, "already_predicted": 0,
                  "completion_tokens": 20, "generation_seconds": 2.0, "tokens_per_second": 10.0, "params": {"t": 1},
                  "finish_reasons": {"stop": 1, "length": 1},
                  "samples": [{"record_id": "r9", "category": "open_qa", "instruction": "Say <script>x</script>",
                               "context": "", "reference": "ref answer", "response": "model answer",
                               "finish_reason": "stop", "completion_tokens": 5}]},
        "tables": [{"table": "bronze", "version": 3, "operation": "MERGE", "written_by": "pipeline-x-ingest",
                    "location": "/w/dollyflow/bronze"}],
    }


def test_every_plot_is_a_png():
    d = synthetic()
    for png in (plots.plot_categories(d["categories"]), plots.plot_counts(d["quarantine"], "t", "lines"),
                plots.plot_lengths(d["tokens"]), plots.plot_loss(d["train"]["metrics"]),
                plots.plot_category_loss(d["train"]["metrics"][-1]["eval_loss_per_category"])):
        assert png.startswith(PNG) and len(png) > 2000


def test_html_has_every_section_the_images_and_escapes_text():
    html = report.render_html(synthetic())
    for key, title in report.SECTIONS:
        assert f'<h2 id="{key}">{title}</h2>' in html
    # categories, quarantine, duplicates, lengths, loss, per-category loss, finish reasons
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', html)) == 7
    assert "<script>" not in html and "Say &lt;script&gt;x&lt;/script&gt;" in html
    assert "ref answer" in html and "model answer" in html
    assert "abc123" in html and "too_long 4" in html and "unchanged" in html
    assert "<td class=\"num\">3</td>" in html       # bronze's version in the tables section


def test_empty_sections_say_so_instead_of_drawing():
    d = synthetic()
    d.update(quarantine={}, duplicates={}, infer={})
    d["train"]["metrics"] = []
    html = report.render_html(d)
    assert "No line was quarantined" in html and "No duplicates" in html
    assert "inference did not run" in html and "no training metrics" in html
    assert len(re.findall(r"<img ", html)) == 2     # categories, lengths


@pytest.mark.parametrize("name,summary,changes,status", [
    ("ingest", {"lines_read": 100, "files": 1, "rows_new": 0, "rows_existing": 100, "rows_quarantined": 0},
     {"bronze": [0, 0], "quarantine": [0, 0]}, "unchanged"),
    ("ingest", {"lines_read": 100, "files": 1, "rows_new": 3, "rows_existing": 97, "rows_quarantined": 0},
     {"bronze": [0, 1], "quarantine": [0, 0]}, "changed"),
    ("dedupe", {"skipped": True, "input_rows": 5}, {"silver": [0, 0]}, "unchanged"),
    ("tokenize", {"skipped": False, "records": {"train": 9}}, {"tokenized": [0, 0]}, "changed"),
    ("train", {"skipped": True, "output_dir": "/m"}, {}, "unchanged"),
    ("train", {"skipped": False, "steps": 3}, {}, "changed"),
    ("infer", {"generated": 0}, {"predictions": [2, 2]}, "unchanged"),
])
def test_job_status(name, summary, changes, status):
    assert job_status(name, summary, changes) == status


def test_human_lines_name_the_numbers():
    line = human_line("ingest", {"lines_read": 1200, "files": 2, "rows_new": 1000, "rows_existing": 150,
                                 "rows_quarantined": 50, "quarantined_by_reason": {"invalid_json": 50}},
                      {"bronze": [None, 0], "quarantine": [0, 1]})
    assert line == ("1,200 lines from 2 file(s) -> 1,000 new, 150 already in bronze or repeated, 50 quarantined "
                    "(invalid_json 50) | bronze new->v0, quarantine v0->v1")
    line = human_line("train", {"steps": 33, "train_loss_first": 10.83, "train_loss": 6.796, "eval_loss": 8.484,
                                "tokens_per_s": 2889.2, "useful_tokens_per_s": 1292.0, "output_dir": "/m",
                                "mlflow_run_id": "r1"})
    assert "33 steps, loss 10.83 -> 6.796, eval loss 8.484, 2,889 tokens/s (1,292 on response tokens)" in line
    assert human_line("infer", {"skipped": "infer.model is not set"}) == "skipped: infer.model is not set"


def test_infer_line_says_how_long_the_model_loads_took():
    s = {"rows_in": 6, "input": {"table": "silver", "split": "test"}, "generated": 6, "already_predicted": 0,
         "finish_reasons": {"length": 6}, "completion_tokens": 1536, "tokens_per_second": 214.7,
         "workers": {"workers": 2, "loads": 2, "loads_per_worker": 1, "load_seconds": 4.06}}
    assert human_line("infer", s) == ("6 rows of silver (test split): 6 generated, 0 already predicted; finish "
                                      "length 6; 1,536 tokens at 214.7 tokens/s (model loads: 2, slowest 4.1 s)")
    s["workers"] = {"workers": 2, "loads": 0, "loads_per_worker": 0, "load_seconds": 0.0}    # reused workers
    assert human_line("infer", s).endswith("1,536 tokens at 214.7 tokens/s")


MATHTEXT_LABELS = ["$x$", "a_b^c", "\\alpha", "$\\frac{1}{$", "cost $5 or $6", "50% $", "${unclosed$"]


def test_labels_with_mathtext_characters_are_drawn_as_text():
    """Labels come from the data (a category, a quarantine reason): one with '$', '_', '^' or a
    backslash must not fail the plot (a malformed formula raises in matplotlib's mathtext parser)."""
    counts = {label: i + 1 for i, label in enumerate(MATHTEXT_LABELS)}
    cats = {label: {"bronze": 2, "silver": 1} for label in MATHTEXT_LABELS}
    pngs = [plots.plot_counts(counts, "Quarantined $lines$ per reason", "lines"), plots.plot_categories(cats),
            plots.plot_category_loss({label: {"loss": 1.5, "records": 2} for label in MATHTEXT_LABELS})]
    assert all(p.startswith(PNG) for p in pngs)
    d = synthetic()
    d["categories"], d["quarantine"] = cats, counts
    d["tokens"]["splits"] = {"$tr_ain$": d["tokens"]["splits"]["train"]}
    html = report.render_html(d)
    assert "$\\frac{1}{$" in html and html.count("<img ") == 7


def test_tokenize_line_says_when_its_shards_are_not_current():
    s = {"records_in": 10, "records": {"train": 8}, "tokens": {"train": 80}, "drops": {}, "max_length": 64}
    assert "NOT the current" not in human_line("tokenize", {**s, "shards_current": True})
    line = human_line("tokenize", {**s, "shards_current": False, "not_current": "LATEST.json names v5-x"})
    assert line.endswith("\n    NOT the current shards: LATEST.json names v5-x")


def test_literal_text_leaves_the_global_setting_alone():
    import matplotlib
    before = matplotlib.rcParams["text.parse_math"]
    plots.plot_counts({"$x$": 1}, "t", "n")
    assert matplotlib.rcParams["text.parse_math"] == before


def test_filter_section_shows_removed_per_stage_and_reason_and_redactions_per_kind():
    d = synthetic()
    assert "the filter job did not run" in report.render_html(d)
    d["filter"] = {"ran": True, "rows_in": 10, "rows_kept": 7, "rows_removed": 3, "records_redacted": 2,
                   "removed": {"pii": {"pii_credit_card": 1}, "quality": {"empty_response": 2}},
                   "redactions": {"email": 2, "phone": 1},
                   "examples": [{"record_id": "r1", "stage": "pii", "reason": "pii_credit_card",
                                 "detail": "credit_card in response", "span": "<4111>"}]}
    html = report.render_html(d)
    pre = '<td class="pre">'
    assert f'{pre}pii</td>{pre}pii_credit_card</td><td class="num">1</td>' in html
    assert f'{pre}quality</td>{pre}empty_response</td><td class="num">2</td>' in html
    assert f'{pre}email</td><td class="num">2</td>' in html and "&lt;4111&gt;" in html
    assert "7 kept in curated, 3 removed; 2 kept records" in html
