"""Percentile bootstrap intervals of means, per category and overall, and the paired bootstrap of
a difference between two models on the same rows (engine-free, numpy only).

- :func:`mean_ci`: the mean of the rows and the ``level`` (default 95%) percentile interval of
  the means of ``resamples`` resamples drawn with replacement.
- :func:`paired_ci`: for aligned arrays ``a`` and ``b`` (one row per record, the same record in
  both), the mean of ``b - a``, its interval, and ``p_b_better``: the share of resamples whose
  mean difference is above 0. Resampling the per-row differences keeps the pairing.
- :func:`aggregate` / :func:`paired`: the same per category and overall.

Missing values (NaN, or ``None`` in the input) are not resampled: :func:`mean_ci` counts them
in ``missing``; :func:`paired_ci` drops a row missing on either side and counts it in
``dropped``. No rows left gives NaN figures with ``n == 0``, never an error. Rows present for one
model only are the caller's to remove: the arrays passed must be aligned (equal lengths,
checked).

Deterministic for a seed: each category draws from its own stream, ``numpy.random.default_rng([seed,
crc32(category)])`` (``"overall"`` for all rows), so a category's interval does not depend on
which other categories are present or in what order the rows come. Resampling is vectorised: a
matrix of resample indices, drawn in chunks of at most :data:`CHUNK_ELEMENTS` indices.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
OVERALL = "overall"
#: Fewest paired records a difference is called on (better or worse); below it the report says
#: "too few records to call" whatever the interval.
MIN_CALL_ROWS = 10
#: Indices drawn at once (int32: 16 MiB); bounds the memory whatever the rows and resamples.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval over ``n`` rows (``missing`` rows had no value)."""
    mean: float
    low: float
    high: float
    n: int
    missing: int = 0


@dataclass(frozen=True)
class Comparison:
    """B against A on the same ``n`` rows: the means, ``diff = mean_b - mean_a``, its interval,
    and the share of resamples in which B's mean is above A's (``dropped`` rows lacked a value on
    one side or both)."""
    n: int
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    p_b_better: float
    dropped: int = 0

    @property
    def significant(self) -> bool:
        """Whether the interval of the difference excludes 0, over at least
        :data:`MIN_CALL_ROWS` records (a percentile bootstrap of fewer rows gives intervals far
        too narrow: one record gives a zero-width interval around its own difference)."""
        return self.n >= MIN_CALL_ROWS and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Aggregate:
    overall: Interval
    by_category: dict[str, Interval]


@dataclass(frozen=True)
class PairedAggregate:
    overall: Comparison
    by_category: dict[str, Comparison]


def rng_for(seed: int, label: str = OVERALL) -> np.random.Generator:
    """The generator of one category (or :data:`OVERALL`) under ``seed``."""
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([int(seed), zlib.crc32(str(label).encode("utf-8"))])


def resample_means(values, rng: np.random.Generator, resamples: int = DEFAULT_RESAMPLES) -> np.ndarray:
    """The means of ``resamples`` bootstrap resamples of the rows of ``values``: shape
    ``(resamples,)`` for a 1-d array, ``(resamples, k)`` for ``(n, k)`` (every column resampled
    with the same rows). ``values`` must be non-empty and without NaN."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("no rows to resample")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    width = int(np.prod(values.shape[1:], dtype=np.int64)) if values.ndim > 1 else 1
    chunk = max(1, CHUNK_ELEMENTS // (n * width))
    index_type = np.int32 if n < 2 ** 31 else np.int64
    out = np.empty((resamples,) + values.shape[1:], dtype=np.float64)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n), dtype=index_type)
        out[start:stop] = values[idx].sum(axis=1) / n
    return out


def percentile_bounds(means: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def _floats(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def mean_ci(values: Sequence[float | None], *, seed: int, resamples: int = DEFAULT_RESAMPLES,
            level: float = DEFAULT_LEVEL, label: str = OVERALL) -> Interval:
    """The mean of the non-missing ``values`` and its percentile bootstrap interval."""
    arr = _floats(values, "values")
    ok = ~np.isnan(arr)
    kept, missing = arr[ok], int((~ok).sum())
    if kept.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, missing)
    low, high = percentile_bounds(resample_means(kept, rng_for(seed, label), resamples), level)
    return Interval(float(kept.mean()), low, high, int(kept.size), missing)


def paired_ci(a: Sequence[float | None], b: Sequence[float | None], *, seed: int,
              resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
              label: str = OVERALL) -> Comparison:
    """The paired bootstrap of ``mean(b - a)`` over the rows where both have a value."""
    x, y = _floats(a, "a"), _floats(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must be aligned: {x.size} and {y.size} rows")
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y, dropped = x[ok], y[ok], int((~ok).sum())
    if x.size == 0:
        nan = float("nan")
        return Comparison(0, nan, nan, nan, nan, nan, nan, dropped)
    means = resample_means(y - x, rng_for(seed, label), resamples)
    low, high = percentile_bounds(means, level)
    mean_a, mean_b = float(x.mean()), float(y.mean())
    return Comparison(int(x.size), mean_a, mean_b, float((y - x).mean()), low, high,
                      float((means > 0).mean()), dropped)


def _groups(categories, n: int) -> dict[str, np.ndarray]:
    cats = np.asarray(categories, dtype=object)
    if cats.shape != (n,):
        raise ValueError(f"categories must be aligned with the values: {cats.size} and {n} rows")
    labels = np.array(["" if c is None else str(c) for c in cats], dtype=object)
    if OVERALL in set(labels):
        raise ValueError(f"{OVERALL!r} is reserved for all rows; it cannot be a category")
    return {str(c): np.flatnonzero(labels == c) for c in sorted(set(labels))}


def aggregate(values: Sequence[float | None], categories: Sequence[str], *, seed: int,
              resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL) -> Aggregate:
    """:func:`mean_ci` overall and per category (a ``None`` category is ``""``)."""
    arr = _floats(values, "values")
    groups = _groups(categories, arr.size)
    kw = dict(seed=seed, resamples=resamples, level=level)
    return Aggregate(mean_ci(arr, **kw),
                     {c: mean_ci(arr[idx], label=c, **kw) for c, idx in groups.items()})


def paired(a: Sequence[float | None], b: Sequence[float | None], categories: Sequence[str], *, seed: int,
           resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL) -> PairedAggregate:
    """:func:`paired_ci` overall and per category."""
    x, y = _floats(a, "a"), _floats(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must be aligned: {x.size} and {y.size} rows")
    groups = _groups(categories, x.size)
    kw = dict(seed=seed, resamples=resamples, level=level)
    return PairedAggregate(paired_ci(x, y, **kw),
                           {c: paired_ci(x[idx], y[idx], label=c, **kw) for c, idx in groups.items()})
