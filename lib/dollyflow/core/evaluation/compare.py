"""The evaluate job's aggregates of scored records, per model and compared between models
(engine-free, numpy only): the driver hands it the metric columns of each *side* (a model and
parameter set) over the same records in the same order.

- :func:`with_headline`: adds the ``headline`` column, each record's value of its category's
  headline metric (:mod:`~dollyflow.core.evaluation.headline`), so "overall" has a headline too.
- :func:`summarize`: per side and metric, the mean and bootstrap interval overall and per
  category; for every side after the first, the paired bootstrap of ``side - first`` per metric;
  and the headline table (per category: its metric, each side's interval, the differences). All
  JSON-ready (NaN is ``None``).
- :func:`judge_values` and :func:`judge_rates`: a judged side's outcomes as per-record judge
  scores (the :data:`~dollyflow.core.evaluation.headline.JUDGE` column :func:`summarize` takes
  beside the metrics) and as win/tie/loss rates with intervals, overall and per category.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from dollyflow.core.evaluation.bootstrap import (DEFAULT_LEVEL, DEFAULT_RESAMPLES, OVERALL, Comparison, Interval,
                                                 aggregate, paired)
from dollyflow.core.evaluation.headline import headline_metric
from dollyflow.core.evaluation.judge import LOSS, OUTCOMES, TIE, WIN, WinRates, win_rates
from dollyflow.core.evaluation.metrics import METRICS

HEADLINE = "headline"


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else round(float(x), 6)


def interval_dict(iv: Interval) -> dict:
    return {"mean": _num(iv.mean), "low": _num(iv.low), "high": _num(iv.high), "n": iv.n, "missing": iv.missing}


def comparison_dict(c: Comparison) -> dict:
    return {"n": c.n, "mean_a": _num(c.mean_a), "mean_b": _num(c.mean_b), "diff": _num(c.diff), "low": _num(c.low),
            "high": _num(c.high), "p_b_better": _num(c.p_b_better), "significant": bool(c.significant),
            "dropped": c.dropped}


def with_headline(values: Mapping[str, np.ndarray], categories: Sequence[str], *, judged: bool = False) -> dict:
    """``values`` (metric -> per-record array) plus :data:`HEADLINE`: each record's value of its
    category's headline metric (a metric not in ``values``, such as the judge's score without a
    judge, gives NaN)."""
    cats = ["" if c is None else str(c) for c in categories]
    n = len(cats)
    out = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    head = np.full(n, np.nan)
    for cat in set(cats):
        metric = headline_metric(cat, judged=judged)
        if metric in out:
            idx = np.fromiter((i for i, c in enumerate(cats) if c == cat), dtype=np.int64)
            head[idx] = out[metric][idx]
    out[HEADLINE] = head
    return out


def summarize(sides: Sequence[str], categories: Sequence[str], values: Mapping[str, Mapping[str, np.ndarray]], *,
              seed: int, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
              metrics: Sequence[str] = METRICS, judged: bool = False) -> dict:
    """``values[side][metric]``: one value per record, the records in the same order for every
    side and aligned with ``categories`` (``None`` or NaN: no value, e.g. an empty reference).

    Returns ``{"aggregates": {side: {metric: {"overall": interval, "by_category": {cat:
    interval}}}}, "comparisons": {"<side> - <first>": {metric: {"overall": comparison,
    "by_category": {...}}}}, "headline": {cat or "overall": {"metric": name, "sides": {side:
    interval}, "diff": {"<side> - <first>": comparison}}}}``; ``metrics`` plus :data:`HEADLINE`
    are aggregated."""
    if not sides:
        raise ValueError("no sides to summarize")
    cats = ["" if c is None else str(c) for c in categories]
    cols = {s: with_headline({m: values[s][m] for m in metrics}, cats, judged=judged) for s in sides}
    names = [*metrics, HEADLINE]
    kw = dict(seed=seed, resamples=resamples, level=level)
    aggregates: dict = {}
    for s in sides:
        aggregates[s] = {}
        for m in names:
            agg = aggregate(cols[s][m], cats, **kw)
            aggregates[s][m] = {OVERALL: interval_dict(agg.overall),
                                "by_category": {c: interval_dict(iv) for c, iv in agg.by_category.items()}}
    comparisons: dict = {}
    first = sides[0]
    for s in sides[1:]:
        key = f"{s} - {first}"
        comparisons[key] = {}
        for m in names:
            p = paired(cols[first][m], cols[s][m], cats, **kw)
            comparisons[key][m] = {OVERALL: comparison_dict(p.overall),
                                   "by_category": {c: comparison_dict(x) for c, x in p.by_category.items()}}
    table: dict = {}
    for cat in [*sorted(set(cats)), OVERALL]:
        metric = HEADLINE if cat == OVERALL else headline_metric(cat, judged=judged)
        source = HEADLINE if cat == OVERALL else (metric if metric in names else None)

        def pick(d: dict) -> dict | None:
            if source is None:
                return None
            return d[source][OVERALL] if cat == OVERALL else d[source]["by_category"].get(cat)

        table[cat] = {"metric": metric, "sides": {s: pick(aggregates[s]) for s in sides},
                      "diff": {k: pick(v) for k, v in comparisons.items()}}
    return {"aggregates": aggregates, "comparisons": comparisons, "headline": table}


#: The judge score of each outcome (wins + half the ties); unparseable and unjudged rows have none.
JUDGE_SCORES = {WIN: 1.0, TIE: 0.5, LOSS: 0.0}


def judge_values(verdicts: Sequence[str | None]) -> np.ndarray:
    """Per record the judge score of its outcome (:data:`JUDGE_SCORES`); NaN for an unparseable
    or unjudged (``None``) row, so the means and the paired bootstrap leave them out."""
    bad = [v for v in verdicts if v is not None and v not in OUTCOMES]
    if bad:
        raise ValueError(f"not an outcome: {bad[0]!r} (expected one of {OUTCOMES} or None)")
    return np.array([JUDGE_SCORES.get(v, np.nan) if v is not None else np.nan for v in verdicts], dtype=np.float64)


def rates_dict(w: WinRates) -> dict:
    return {"n": w.n, "unparseable": w.unparseable, "win": interval_dict(w.win), "tie": interval_dict(w.tie),
            "loss": interval_dict(w.loss), "score": interval_dict(w.score)}


def judge_rates(categories: Sequence[str], verdicts: Sequence[str | None], *, seed: int,
                resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL) -> dict:
    """One side's judge outcomes (``verdicts[i]``: record ``i``'s win, tie, loss or unparseable;
    ``None``: not judged) as ``{"overall": rates, "by_category": {cat: rates}, "judged": n,
    "not_judged": n}``, each rates :func:`rates_dict` of
    :func:`~dollyflow.core.evaluation.judge.win_rates` over that category's judged rows (a
    category or run without a parseable verdict has ``n`` 0 and null rates, its unparseable rows
    counted)."""
    cats = ["" if c is None else str(c) for c in categories]
    if len(cats) != len(verdicts):
        raise ValueError(f"{len(cats)} categories for {len(verdicts)} verdicts")
    kw = dict(seed=seed, resamples=resamples, level=level)
    judged = [(c, v) for c, v in zip(cats, verdicts) if v is not None]
    by_category = {}
    for cat in sorted({c for c, _ in judged}):
        by_category[cat] = rates_dict(win_rates([v for c, v in judged if c == cat], label=cat, **kw))
    return {"overall": rates_dict(win_rates([v for _, v in judged], label=OVERALL, **kw)),
            "by_category": by_category, "judged": len(judged), "not_judged": len(verdicts) - len(judged)}
