"""Deterministic train/test split by hash of ``record_id`` and a seed (engine-free).

Each record gets a split key: the top 63 bits of ``xxh64(record_id, seed)`` (non-negative, fits a
signed 64-bit column). A record's key depends only on its id and the seed, never on partitioning
or row order, so:

- ``test_size`` as a fraction (0 < f < 1): a record is in test when ``key < f * 2**63``;
- ``test_size`` as a count (an integer >= 1, Dolly used 1000): the ``n`` records with the
  smallest ``(key, record_id)`` are the test split.

Both are identical whatever the partitioning, and stable across re-runs.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import xxhash

TRAIN = "train"
TEST = "test"
KEY_SPACE = 1 << 63


def split_key(record_id: str, seed: int = 42) -> int:
    """The record's split key in ``[0, 2**63)``."""
    return xxhash.xxh64_intdigest(record_id.encode("utf-8"), seed=int(seed) & 0xFFFFFFFFFFFFFFFF) >> 1


def split_keys(record_ids: Iterable[str], seed: int = 42) -> list[int]:
    return [split_key(r, seed) for r in record_ids]


def parse_test_size(test_size: float | int) -> tuple[str, float | int]:
    """``("fraction", f)`` for 0 < test_size < 1, ``("count", n)`` for a whole number >= 1, and
    ``("count", 0)`` for 0 (no test split). A whole number is always a count, so ``1`` and ``1.0``
    mean one test record, never "everything"; 1.5, negative numbers, NaN and infinity are
    rejected."""
    import math

    try:
        v = float(test_size)
    except (TypeError, ValueError):
        raise ValueError(f"test_size {test_size!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"test_size must be a count >= 1, a fraction in (0, 1) or 0, got {test_size!r}")
    if 0 < v < 1:
        return "fraction", v
    if v != int(v):
        raise ValueError(f"test_size {test_size!r} is ambiguous: use a fraction in (0, 1) or a whole count "
                         "(a whole number, 1.0 included, is a number of records)")
    return "count", int(v)


def check_count(n_test: int, total: int) -> None:
    """A count must leave at least one training record."""
    if total and n_test >= total:
        raise ValueError(f"test_size={n_test} leaves no training records (only {total} records); "
                         "use a smaller count or a fraction such as 0.1")


def fraction_threshold(fraction: float) -> int:
    """Keys strictly below this are in test."""
    return int(fraction * KEY_SPACE)


def assign_splits(record_ids: Sequence[str], test_size: float | int, seed: int = 42) -> list[str]:
    """The split of each record (pure Python reference; the Spark job computes the same)."""
    keys = split_keys(record_ids, seed)
    mask = select_test(keys, record_ids, test_size)
    return [TEST if t else TRAIN for t in mask]


def select_test(keys: Sequence[int], record_ids: Sequence[str], test_size: float | int):
    """Which records are in test (a numpy bool array), given their split keys: below the
    fraction's threshold, or the ``n`` smallest ``(key, record_id)`` for a count."""
    import numpy as np

    keys = np.asarray(keys, dtype=np.int64)
    mode, value = parse_test_size(test_size)
    if mode == "fraction":
        return keys < fraction_threshold(value)
    check_count(value, len(keys))
    mask = np.zeros(len(keys), dtype=bool)
    if value == 0:
        return mask
    # the value-th smallest key; ties at it are broken by record_id
    kth = np.partition(keys, value - 1)[value - 1]
    mask[keys < kth] = True
    need = value - int(mask.sum())
    tied = np.flatnonzero(keys == kth)
    tied = sorted(tied.tolist(), key=lambda i: record_ids[i])
    mask[tied[:need]] = True
    return mask
