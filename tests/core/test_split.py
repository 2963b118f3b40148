"""Hash split: deterministic, exact counts, independent of order and partitioning."""
import random

import pytest

from dollyflow.core.split import KEY_SPACE, assign_splits, parse_test_size, split_key, split_keys

IDS = [f"{i:016x}" for i in range(2000)]


def test_key_depends_on_id_and_seed_only():
    assert split_key("abc", 42) == split_key("abc", 42)
    assert split_key("abc", 42) != split_key("abc", 43)
    assert split_key("abc", 42) != split_key("abd", 42)
    assert all(0 <= k < KEY_SPACE for k in split_keys(IDS))


def test_count_is_exact_and_stable_under_reordering_and_chunking():
    base = dict(zip(IDS, assign_splits(IDS, 100)))
    assert sum(v == "test" for v in base.values()) == 100
    shuffled = IDS[:]
    random.Random(1).shuffle(shuffled)
    assert dict(zip(shuffled, assign_splits(shuffled, 100))) == base
    # per-record keys computed in any chunking (as Spark partitions would) are the same keys
    chunks = [shuffled[i:i + 37] for i in range(0, len(shuffled), 37)]
    keys = {r: k for c in chunks for r, k in zip(c, split_keys(c))}
    test = set(sorted(keys, key=lambda r: (keys[r], r))[:100])
    assert {r for r, v in base.items() if v == "test"} == test


def test_fraction_is_per_record_and_about_right():
    s = assign_splits(IDS, 0.1)
    assert 150 < s.count("test") < 250
    # a record's split under a fraction does not depend on the other records
    assert assign_splits(IDS[:500], 0.1) == s[:500]


def test_seed_changes_the_split():
    assert assign_splits(IDS, 100, seed=1) != assign_splits(IDS, 100, seed=2)


def test_test_size_parsing_and_errors():
    assert parse_test_size(1000) == ("count", 1000)
    assert parse_test_size(1000.0) == ("count", 1000)
    assert parse_test_size(0.25) == ("fraction", 0.25)
    assert assign_splits(IDS[:5], 0) == ["train"] * 5
    with pytest.raises(ValueError):
        parse_test_size(2.5)
    with pytest.raises(ValueError):
        parse_test_size(-1)
    with pytest.raises(ValueError, match="no training records"):
        assign_splits(IDS[:10], 10)


def test_test_mask_breaks_key_ties_by_record_id():
    import numpy as np

    from dollyflow.core.split import select_test
    keys = [5, 3, 3, 3, 9, 1]
    rids = ["e", "c2", "c1", "c3", "x", "a"]
    assert select_test(keys, rids, 3).tolist() == [False, True, True, False, False, True]   # a, c1, c2
    assert select_test(keys, rids, 1).tolist() == [False, False, False, False, False, True]
    assert select_test(np.array(keys), rids, 0).sum() == 0
    assert select_test([1, 2, 3], ["a", "b", "c"], 0.5).tolist() == [True, True, True]   # keys far below 2**62
