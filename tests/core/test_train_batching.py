"""Length-grouped batching, token budgets and equal step counts over ranks (numpy only, ms)."""
import numpy as np
import pytest

from dollyflow.core.training import batching


def lengths(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(20, 512, size=n)


def flat(batches):
    return np.concatenate(batches) if batches else np.zeros(0, int)


@pytest.mark.parametrize("kw", [dict(batch_size=8), dict(batch_tokens=2048), dict(batch_size=3, group_size=2)])
def test_every_record_exactly_once_per_epoch(kw):
    ls = lengths()
    for epoch in range(3):
        b = batching.train_batches(ls, seed=42, epoch=epoch, **kw)
        assert sorted(flat(b).tolist()) == list(range(len(ls)))


def test_same_seed_same_order_other_epoch_or_seed_other_order():
    ls = lengths()
    a = batching.train_batches(ls, seed=42, epoch=0, batch_size=8)
    b = batching.train_batches(ls, seed=42, epoch=0, batch_size=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    c = batching.train_batches(ls, seed=42, epoch=1, batch_size=8)
    d = batching.train_batches(ls, seed=7, epoch=0, batch_size=8)
    assert not np.array_equal(flat(a), flat(c))
    assert not np.array_equal(flat(a), flat(d))
    e = batching.train_batches(ls, seed=42, epoch=0, rank=1, batch_size=8)
    assert not np.array_equal(flat(a), flat(e))


def test_length_grouping_cuts_padding_against_random_batches():
    ls = lengths(2000)
    grouped = batching.train_batches(ls, seed=42, epoch=0, batch_size=8)
    perm = np.random.default_rng(1).permutation(len(ls))
    random = [perm[i:i + 8] for i in range(0, len(perm), 8)]
    g, r = batching.padding_share(grouped, ls), batching.padding_share(random, ls)
    assert g < 0.05 < 0.3 < r
    # the batches themselves come in shuffled order, not sorted by length
    maxes = [int(ls[b].max()) for b in grouped]
    assert maxes != sorted(maxes)


def test_token_budget_and_pad_multiple():
    ls = lengths(1000)
    b = batching.train_batches(ls, seed=1, epoch=0, batch_tokens=1024, pad_to_multiple_of=8)
    for x in b:
        width = batching.padded_width(int(ls[x].max()), 8)
        assert len(x) * width <= 1024 or len(x) == 1
    assert batching.padded_width(1, 8) == 8 and batching.padded_width(16, 8) == 16 and batching.padded_width(17, 8) == 24
    # short records pack many per batch, long ones few
    sizes = {len(x) for x in b}
    assert max(sizes) >= 10 and min(sizes) <= 3


def test_equalize_splits_without_dropping_or_repeating():
    ls = lengths(101)
    b = batching.train_batches(ls, seed=3, epoch=0, batch_size=8)
    target = len(b) + 5
    e = batching.equalize(b, target)
    assert len(e) == target
    assert sorted(flat(e).tolist()) == list(range(101))
    assert max(len(x) for x in e) <= 8
    with pytest.raises(ValueError):
        batching.equalize(b, len(b) - 1)


def test_equalize_repeats_only_when_every_batch_has_one_record():
    b = [np.array([0, 1]), np.array([2])]
    e = batching.equalize(b, 5)
    assert [x.tolist() for x in e] == [[0], [1], [2], [0], [1]]
    with pytest.raises(ValueError, match="no training records"):
        batching.equalize([], 2)


def test_ranks_with_different_record_counts_get_the_same_step_count():
    rank_lengths = [lengths(120, 0), lengths(90, 1)]          # shards balanced by tokens, not records
    per_rank = [batching.train_batches(ls, seed=42, epoch=0, rank=r, batch_size=8)
                for r, ls in enumerate(rank_lengths)]
    target = batching.steps_target([len(p) for p in per_rank], grad_accum=4)
    assert target % 4 == 0 and target >= max(len(p) for p in per_rank)
    eq = [batching.equalize(p, target) for p in per_rank]
    assert [len(p) for p in eq] == [target, target]
    for p, ls in zip(eq, rank_lengths):
        assert sorted(flat(p).tolist()) == list(range(len(ls)))


def test_eval_batches_sorted_and_complete():
    ls = lengths(50)
    b = batching.eval_batches(ls, 4)
    assert sorted(flat(b).tolist()) == list(range(50))
    assert [int(ls[x].max()) for x in b] == sorted(int(ls[x].max()) for x in b)
