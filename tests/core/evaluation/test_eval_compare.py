"""The evaluate job's aggregates (core/evaluation/compare.py): the headline column, per-side
intervals, the paired comparison against the first side, JSON-ready output."""
import json

import numpy as np

import pytest

from dollyflow.core.evaluation.compare import HEADLINE, judge_rates, judge_values, summarize, with_headline
from dollyflow.core.evaluation.headline import JUDGE
from dollyflow.core.evaluation.metrics import METRICS

CATS = ["closed_qa", "summarization", "open_qa", "closed_qa"]


def _side(value: float, n: int = 4) -> dict:
    return {m: np.full(n, value) for m in METRICS}


def test_headline_takes_each_categorys_metric():
    values = {"token_f1": np.array([0.1, 0.2, 0.3, 0.4]), "rougeL": np.array([0.5, 0.6, 0.7, 0.8])}
    out = with_headline(values, CATS)
    # closed_qa: token F1; summarization and (no judge) open_qa: ROUGE-L
    assert out[HEADLINE].tolist() == [0.1, 0.6, 0.7, 0.4]


def test_summarize_intervals_comparisons_and_headline_table():
    rng = np.random.default_rng(0)
    n = 200
    cats = [CATS[i % 4] for i in range(n)]
    a = {m: rng.uniform(0, 0.5, n) for m in METRICS}
    b = {m: a[m] + 0.2 for m in METRICS}            # a planted difference
    a["rougeL"][0] = np.nan                          # an unscored record
    out = summarize(["A", "B"], cats, {"A": a, "B": b}, seed=7, resamples=200)
    json.dumps(out)                                  # JSON-ready, NaN as None
    iv = out["aggregates"]["A"]["rougeL"]["overall"]
    assert iv["n"] == n - 1 and iv["missing"] == 1 and iv["low"] <= iv["mean"] <= iv["high"]
    diff = out["comparisons"]["B - A"]["token_f1"]["overall"]
    assert abs(diff["diff"] - 0.2) < 1e-9 and diff["significant"] and diff["p_b_better"] == 1.0
    head = out["headline"]
    assert head["closed_qa"]["metric"] == "token_f1" and head["summarization"]["metric"] == "rougeL"
    assert head["overall"]["metric"] == HEADLINE and set(head["overall"]["sides"]) == {"A", "B"}
    assert head["closed_qa"]["diff"]["B - A"]["significant"]
    again = summarize(["A", "B"], cats, {"A": a, "B": b}, seed=7, resamples=200)
    assert again == out                              # seeded


def test_no_difference_between_equal_sides_and_one_side_alone():
    out = summarize(["A", "B"], CATS, {"A": _side(0.5), "B": _side(0.5)}, seed=1, resamples=50)
    assert not out["comparisons"]["B - A"]["rougeL"]["overall"]["significant"]
    alone = summarize(["A"], CATS, {"A": _side(0.5)}, seed=1, resamples=50)
    assert alone["comparisons"] == {} and alone["headline"]["overall"]["diff"] == {}


def test_judge_values_score_outcomes_and_leave_out_the_rest():
    got = judge_values(["win", "tie", "loss", "unparseable", None])
    assert got[:3].tolist() == [1.0, 0.5, 0.0] and np.isnan(got[3:]).all()
    with pytest.raises(ValueError, match="not an outcome: 'B'"):
        judge_values(["B"])


def test_judge_rates_per_category_count_unparseable_and_unjudged_rows():
    cats = ["open_qa", "open_qa", "open_qa", "brainstorming", "brainstorming", "closed_qa"]
    verdicts = ["win", "win", "loss", "unparseable", None, "tie"]
    out = judge_rates(cats, verdicts, seed=3, resamples=200)
    json.dumps(out)
    assert (out["judged"], out["not_judged"]) == (5, 1)
    overall = out["overall"]
    assert (overall["n"], overall["unparseable"]) == (4, 1)
    assert overall["win"]["mean"] == 0.5 and overall["tie"]["mean"] == 0.25 and overall["loss"]["mean"] == 0.25
    assert overall["score"]["mean"] == 0.625 and overall["score"]["low"] <= 0.625 <= overall["score"]["high"]
    assert out["by_category"]["open_qa"]["score"]["mean"] == pytest.approx(2 / 3, abs=1e-6)
    # a category whose only judged row is unparseable: no rates, the row counted, nothing guessed
    assert out["by_category"]["brainstorming"]["n"] == 0 and out["by_category"]["brainstorming"]["unparseable"] == 1
    assert out["by_category"]["brainstorming"]["win"]["mean"] is None
    assert judge_rates(cats, verdicts, seed=3, resamples=200) == out        # seeded
    with pytest.raises(ValueError, match="6 categories for 2 verdicts"):
        judge_rates(cats, ["win", "tie"], seed=3)


def test_judged_summary_heads_open_categories_with_the_judge_score():
    cats = ["open_qa"] * 12 + ["closed_qa"] * 2
    a, b = _side(0.4, 14), _side(0.4, 14)
    a[JUDGE] = np.full(14, 0.5)                      # the baseline against itself
    b[JUDGE] = judge_values(["win"] * 11 + ["loss"] + ["tie", "tie"])
    out = summarize(["A", "B"], cats, {"A": a, "B": b}, seed=2, resamples=200, metrics=[*METRICS, JUDGE],
                    judged=True)
    head = out["headline"]
    assert head["open_qa"]["metric"] == JUDGE and head["closed_qa"]["metric"] == "token_f1"
    assert head["open_qa"]["sides"]["B"]["mean"] == pytest.approx(11 / 12, abs=1e-6)
    assert head["open_qa"]["diff"]["B - A"]["diff"] == pytest.approx(11 / 12 - 0.5, abs=1e-6)
    assert head["open_qa"]["diff"]["B - A"]["significant"]
    # the closed_qa rows' judge ties do not enter its token F1 headline
    assert head["closed_qa"]["diff"]["B - A"]["diff"] == 0.0
