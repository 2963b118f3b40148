"""Bootstrap intervals: deterministic for a seed, sensible on known data, a planted difference
found and a null one not, fast at 100k rows."""
import time

import numpy as np
import pytest

from dollyflow.core.evaluation import bootstrap as bs


def _scores(seed, n=400):
    return np.random.default_rng(seed).uniform(0.2, 0.7, n)


def test_deterministic_for_a_seed():
    v = _scores(0)
    assert bs.mean_ci(v, seed=7) == bs.mean_ci(v, seed=7)
    assert bs.mean_ci(v, seed=7) != bs.mean_ci(v, seed=8)
    a, b = _scores(1), _scores(2)
    assert bs.paired_ci(a, b, seed=3) == bs.paired_ci(a, b, seed=3)


def test_chunking_does_not_change_the_draws(monkeypatch):
    v = _scores(0, 1000)
    whole = bs.mean_ci(v, seed=5, resamples=300)
    monkeypatch.setattr(bs, "CHUNK_ELEMENTS", 7_000)     # 7 resamples per chunk
    assert bs.mean_ci(v, seed=5, resamples=300) == whole


def test_interval_contains_the_mean():
    for seed in range(5):
        iv = bs.mean_ci(_scores(seed, 50), seed=seed)
        assert iv.low <= iv.mean <= iv.high and iv.low < iv.high
        assert iv.n == 50 and iv.missing == 0
    const = bs.mean_ci([0.25] * 10, seed=0)
    assert const.mean == const.low == const.high == 0.25


def test_a_wider_level_gives_a_wider_interval():
    v = _scores(0)
    narrow, wide = bs.mean_ci(v, seed=1, level=0.5), bs.mean_ci(v, seed=1, level=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high
    with pytest.raises(ValueError):
        bs.mean_ci(v, seed=1, level=1.0)


def test_missing_values_are_counted_not_resampled():
    iv = bs.mean_ci([1.0, None, 0.0, float("nan"), 1.0], seed=0)
    assert iv.n == 3 and iv.missing == 2 and iv.mean == pytest.approx(2 / 3)
    empty = bs.mean_ci([None, None], seed=0)
    assert empty.n == 0 and empty.missing == 2 and np.isnan(empty.mean) and np.isnan(empty.low)
    assert bs.mean_ci([], seed=0).n == 0


def test_resample_means_columns_share_the_rows():
    v = _scores(0, 30)
    one = bs.resample_means(v, bs.rng_for(1), 50)
    two = bs.resample_means(np.column_stack([v, 2 * v]), bs.rng_for(1), 50)
    assert one.shape == (50,) and two.shape == (50, 2)
    np.testing.assert_allclose(two[:, 0], one)
    np.testing.assert_allclose(two[:, 1], 2 * one)
    with pytest.raises(ValueError):
        bs.resample_means([], bs.rng_for(1), 5)
    with pytest.raises(ValueError):
        bs.rng_for(-1)


# --- paired ----------------------------------------------------------------------------------------

def test_paired_detects_a_planted_difference():
    rng = np.random.default_rng(11)
    a = rng.uniform(0.2, 0.7, 400)
    b = a + 0.05 + rng.normal(0, 0.05, 400)          # better by 0.05 on every row, plus noise
    cmp = bs.paired_ci(a, b, seed=0)
    assert cmp.diff == pytest.approx(b.mean() - a.mean())
    assert 0 < cmp.low < cmp.diff < cmp.high and cmp.significant
    assert cmp.p_b_better == 1.0
    back = bs.paired_ci(b, a, seed=0)                  # the other way round: A is better
    assert back.high < 0 and back.p_b_better == 0.0


def test_paired_does_not_detect_a_null_difference():
    rng = np.random.default_rng(12)
    a = rng.uniform(0.2, 0.7, 400)
    b = a + rng.normal(0, 0.05, 400)                    # same distribution, paired noise only
    cmp = bs.paired_ci(a, b, seed=0)
    assert cmp.low < 0 < cmp.high and not cmp.significant
    assert 0.05 < cmp.p_b_better < 0.95


def test_paired_is_calibrated_over_many_datasets():
    """Null: about 5% of datasets show a difference, and never many; planted: every one does."""
    false_alarms = found = 0
    for seed in range(60):
        rng = np.random.default_rng(1000 + seed)
        a = rng.uniform(0.2, 0.7, 200)
        false_alarms += bs.paired_ci(a, rng.uniform(0.2, 0.7, 200), seed=seed, resamples=400).significant
        found += bs.paired_ci(a, a + 0.05 + rng.normal(0, 0.05, 200), seed=seed, resamples=400).significant
    assert false_alarms <= 9          # 5% of 60 is 3; P(>9) under a 5% test is below 0.001
    assert found == 60


def test_paired_drops_rows_missing_on_either_side_and_checks_lengths():
    cmp = bs.paired_ci([0.1, None, 0.3, 0.5], [0.2, 0.4, float("nan"), 0.9], seed=0)
    assert cmp.n == 2 and cmp.dropped == 2
    assert cmp.mean_a == pytest.approx(0.3) and cmp.mean_b == pytest.approx(0.55)
    assert cmp.diff == pytest.approx(0.25)
    none = bs.paired_ci([None], [1.0], seed=0)
    assert none.n == 0 and none.dropped == 1 and np.isnan(none.diff) and not none.significant
    with pytest.raises(ValueError, match="aligned"):
        bs.paired_ci([0.1, 0.2], [0.1], seed=0)


# --- per category --------------------------------------------------------------------------------

def test_aggregate_per_category_and_overall():
    v = np.array([1.0, 0.0, 1.0, 1.0, None, 0.5], dtype=float)
    cats = ["closed_qa", "closed_qa", "open_qa", "open_qa", "open_qa", None]
    agg = bs.aggregate(v, cats, seed=4)
    assert set(agg.by_category) == {"closed_qa", "open_qa", ""}
    assert agg.overall.n == 5 and agg.overall.missing == 1 and agg.overall.mean == pytest.approx(3.5 / 5)
    assert agg.by_category["closed_qa"].mean == 0.5
    assert agg.by_category["open_qa"].n == 2 and agg.by_category["open_qa"].missing == 1
    assert agg.by_category["open_qa"].low == agg.by_category["open_qa"].high == 1.0
    with pytest.raises(ValueError, match="aligned"):
        bs.aggregate(v, cats[:-1], seed=4)
    with pytest.raises(ValueError, match="reserved"):
        bs.aggregate([1.0], ["overall"], seed=4)


def test_a_categorys_interval_does_not_depend_on_the_others():
    v = _scores(3, 300)
    cats = np.array(["summarization", "closed_qa", "brainstorming"] * 100)
    alone = bs.aggregate(v[cats == "closed_qa"], ["closed_qa"] * 100, seed=9).by_category["closed_qa"]
    order = np.random.default_rng(0).permutation(300)
    mixed = bs.aggregate(v[order], cats[order], seed=9).by_category["closed_qa"]
    assert mixed.mean == pytest.approx(alone.mean)
    # the rows come in another order, so the draws differ, but the stream is the category's own:
    assert bs.aggregate(v, cats, seed=9).by_category["closed_qa"] == alone


def test_paired_per_category_finds_the_category_with_the_difference():
    rng = np.random.default_rng(5)
    n = 300
    cats = np.array(["closed_qa", "open_qa"] * (n // 2))
    a = rng.uniform(0.2, 0.7, n)
    b = a + rng.normal(0, 0.05, n) + np.where(cats == "closed_qa", 0.08, 0.0)
    res = bs.paired(a, b, cats, seed=1)
    assert res.by_category["closed_qa"].significant and res.by_category["closed_qa"].low > 0
    assert not res.by_category["open_qa"].significant
    assert res.overall.n == n and res.overall.low > 0


def test_100k_rows_and_1000_resamples_in_seconds():
    rng = np.random.default_rng(0)
    n = 100_000
    a, b = rng.random(n), rng.random(n)
    cats = rng.choice(["closed_qa", "open_qa", "summarization", "brainstorming"], n)
    start = time.perf_counter()
    bs.aggregate(a, cats, seed=0, resamples=1000)
    bs.paired(a, b, cats, seed=0, resamples=1000)
    assert time.perf_counter() - start < 30     # ~2.5 s on 2 shared cores


def test_a_difference_on_too_few_records_is_never_called():
    # one record: a zero-width interval around its own difference, which must not be called
    one = bs.paired_ci([0.0], [0.9], seed=1)
    assert one.n == 1 and one.low == one.high == pytest.approx(0.9) and not one.significant
    few = bs.paired_ci([0.0] * (bs.MIN_CALL_ROWS - 1), [0.9] * (bs.MIN_CALL_ROWS - 1), seed=1)
    assert few.low > 0 and not few.significant
    enough = bs.paired_ci([0.0] * bs.MIN_CALL_ROWS, [0.9] * bs.MIN_CALL_ROWS, seed=1)
    assert enough.low > 0 and enough.significant
