"""The headline metric of each Dolly category, and the report's text."""
import pytest

from dollyflow.config import DOLLY_CATEGORIES
from dollyflow.core.evaluation import headline as h
from dollyflow.core.evaluation.metrics import METRICS


@pytest.mark.parametrize("category, metric", [
    ("closed_qa", "token_f1"), ("information_extraction", "token_f1"), ("classification", "token_f1"),
    ("summarization", "rougeL"),
    ("open_qa", h.JUDGE), ("general_qa", h.JUDGE), ("brainstorming", h.JUDGE), ("creative_writing", h.JUDGE),
])
def test_headline_per_category(category, metric):
    assert h.headline_metric(category) == metric


def test_every_dolly_category_has_one_group():
    groups = h.SPAN_CATEGORIES + h.SUMMARY_CATEGORIES + h.JUDGED_CATEGORIES
    assert sorted(groups) == sorted(DOLLY_CATEGORIES)


def test_without_a_judge_and_for_other_categories_rouge_l():
    assert h.headline_metric("open_qa", judged=False) == "rougeL"
    assert "no judge was run" in h.headline("open_qa", judged=False).why
    assert h.headline_metric("closed_qa", judged=False) == "token_f1"
    assert h.headline_metric("poetry") == h.headline_metric(None) == "rougeL"


def test_headline_metrics_are_scored_columns():
    for cat in DOLLY_CATEGORIES:
        for judged in (True, False):
            got = h.headline(cat, judged=judged)
            assert {got.metric, *got.companions} <= set(METRICS) | {h.JUDGE}
    assert set(h.REFERENCE_METRICS) == set(METRICS)


def test_explain_names_each_category_and_its_headline():
    text = h.explain()
    for cat in DOLLY_CATEGORIES:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"- **{cat}**"))
        assert h.LABELS[h.headline_metric(cat)] in line
    assert "0–1 scale" in text and "bootstrap" in text
    assert "no judge was run" in h.explain(["brainstorming"], judged=False)
