"""The evaluate job's aggregates (core/evaluation/compare.py): the headline column, per-side
intervals, the paired comparison against the first side, JSON-ready output."""
import json

import numpy as np

from dollyflow.core.evaluation.compare import HEADLINE, summarize, with_headline
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
