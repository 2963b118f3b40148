"""MinHash signatures against exact Jaccard, LSH parameters, band keys, bucket pairs, scoring."""
import itertools
import random
from collections import defaultdict

import numpy as np
import pytest

from dollyflow.testing.dedupe_scoring import score_clusters
from dollyflow.core.minhash import (EMPTY, band_keys, bucket_pairs, compact, estimate_jaccard,
                                    estimate_jaccard_compact, optimal_bands, part_similarity,
                                    permutations, signatures)
from dollyflow.core.text import (batch_shingles, fields_and_key, jaccard, normalized_document,
                                 part_shingles, shingle_set)


def naive_signature(shingles, perms):
    """Reference: per permutation, the minimum of a*x+b mod 2**32 over the set."""
    x = np.array(sorted(shingles), dtype=np.uint64)
    a = perms.a.astype(np.uint64)[:, None]
    b = perms.b.astype(np.uint64)[:, None]
    return ((a * x[None, :] + b) % (1 << 32)).min(axis=1).astype(np.uint32)


def test_permutations_are_deterministic_and_odd():
    p, q = permutations(64, seed=7), permutations(64, seed=7)
    assert np.array_equal(p.a, q.a) and np.array_equal(p.b, q.b)
    assert np.all(p.a % 2 == 1)
    assert not np.array_equal(p.a, permutations(64, seed=8).a)


def test_vectorised_signatures_equal_the_naive_definition():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    texts.append(" ".join(f"long{i}" for i in range(20_000)))   # longer than one block
    texts.append("")                                            # no shingles
    perms = permutations(32, seed=3)
    shingles, docs = batch_shingles(texts, 2)
    sigs = signatures(shingles, docs, len(texts), perms)
    for i, text in enumerate(texts):
        s = shingle_set(text, 2)
        expected = naive_signature(s, perms) if s else np.full(32, EMPTY, dtype=np.uint32)
        assert np.array_equal(sigs[i], expected), i


def sets_with_jaccard(rng, size, j):
    """Two sets of random 32-bit values with Jaccard exactly round(...) near j."""
    shared = int(round(2 * size * j / (1 + j)))
    vals = rng.choice(2**32, size=shared + 2 * (size - shared), replace=False).astype(np.uint32)
    a = vals[:size]
    b = np.concatenate([vals[:shared], vals[size:size + size - shared]])
    return a, b


@pytest.mark.parametrize("target", [0.2, 0.5, 0.7, 0.85, 0.95])
def test_estimated_jaccard_tracks_exact_jaccard(target):
    rng = np.random.default_rng(int(target * 100))
    perms = permutations(256, seed=1)
    errors = []
    for _ in range(40):
        a, b = sets_with_jaccard(rng, 200, target)
        exact = jaccard(set(a.tolist()), set(b.tolist()))
        x = np.concatenate([a, b])
        d = np.r_[np.zeros(a.size, np.int64), np.ones(b.size, np.int64)]
        sig = signatures(x, d, 2, perms)
        errors.append(estimate_jaccard(sig[0], sig[1]) - exact)
        assert abs(estimate_jaccard_compact(compact(sig[0]), compact(sig[1])) - exact) < 0.15
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.02                    # unbiased
    assert np.sqrt((errors ** 2).mean()) < 0.05         # ~ sqrt(J(1-J)/256)


def test_estimate_on_text_near_copies():
    rng = random.Random(1)
    vocab = [f"v{i}" for i in range(5000)]
    perms = permutations(128, seed=42)
    exact, est = [], []
    for _ in range(100):
        words = [rng.choice(vocab) for _ in range(rng.randint(30, 150))]
        edited = [w if rng.random() > 0.05 else rng.choice(vocab) for w in words]
        t1, t2 = " ".join(words), " ".join(edited)
        exact.append(jaccard(shingle_set(t1, 2), shingle_set(t2, 2)))
        shingles, docs = batch_shingles([t1, t2], 2)
        sig = signatures(shingles, docs, 2, perms)
        est.append(estimate_jaccard(sig[0], sig[1]))
    diff = np.array(est) - np.array(exact)
    assert abs(diff.mean()) < 0.02 and np.abs(diff).max() < 0.2


def part_signatures(records, num_perm=128, seed=42):
    """Compact (qa, context) signatures and has-context flags of records, as the dedupe signer."""
    fields = [fields_and_key(r["instruction"], r["context"], r["response"]) for r in records]
    shingles, parts = part_shingles(*([f[k] for f in fields] for k in range(3)), 2)
    m = len(records)
    sigs = compact(signatures(shingles, parts, 2 * m, permutations(num_perm, seed)))
    return sigs[:m], sigs[m:], np.bincount(parts, minlength=2 * m)[m:] > 0


def test_part_similarity_compares_contexts_only_when_both_have_one():
    rng = np.random.default_rng(0)
    qa = rng.integers(0, 2**16, size=(4, 64), dtype=np.uint16)
    ctx = rng.integers(0, 2**16, size=(4, 64), dtype=np.uint16)
    other = ctx.copy()
    other[:, :16] ^= 1                                   # 48 of 64 positions equal: 0.75
    q, c = part_similarity(qa, qa, ctx, other, [True, False, True, False], [True, False, False, True])
    assert q.tolist() == [1.0] * 4
    assert c[0] == pytest.approx(0.75, abs=1e-4) and c[1:].tolist() == [1.0, 0.0, 0.0]


def test_a_shared_passage_alone_never_makes_a_near_duplicate(shared_passage):
    """Different questions about one long passage: as one text they are near copies, compared by
    part they are far apart; a record's near copy (same passage) and exact copy stay close."""
    qs, near, exact = shared_passage["questions"], shared_passage["near"], shared_passage["exact"]
    whole = [shingle_set(normalized_document(r["instruction"], r["context"], r["response"]), 2) for r in qs]
    assert min(jaccard(a, b) for a, b in itertools.combinations(whole, 2)) > 0.7   # the old rule's failure
    qa, ctx, has_ctx = part_signatures([*qs, near, exact])
    i, j = np.array(list(itertools.combinations(range(len(qs)), 2))).T
    q, c = part_similarity(qa[i], qa[j], ctx[i], ctx[j], has_ctx[i], has_ctx[j])
    assert np.all(c > 0.99) and np.all(q < 0.3), q      # same passage, different questions
    n, e = len(qs), len(qs) + 1
    q, c = part_similarity(qa[[n, e]], qa[[1, 2]], ctx[[n, e]], ctx[[1, 2]], has_ctx[[n, e]], has_ctx[[1, 2]])
    assert 0.7 <= q[0] < 1.0 and c[0] == 1.0            # near copy: one word edited in each field
    assert q[1] == c[1] == 1.0                          # exact copy


@pytest.mark.parametrize("threshold,num_perm,fp", [(0.7, 128, 0.5), (0.5, 64, 0.5), (0.8, 256, 0.5),
                                                    (0.7, 128, 0.2), (0.9, 32, 0.3)])
def test_optimal_bands_match_datasketch(threshold, num_perm, fp):
    lsh = pytest.importorskip("datasketch.lsh")
    assert optimal_bands(threshold, num_perm, fp, 1 - fp) == lsh._optimal_param(threshold, num_perm, fp, 1 - fp)


def test_optimal_bands_trade_off():
    b1, r1 = optimal_bands(0.7, 128, 0.5, 0.5)
    b2, r2 = optimal_bands(0.7, 128, 0.2, 0.8)
    assert b1 * r1 <= 128 and b2 * r2 <= 128
    assert b2 > b1 and r2 < r1          # favouring recall: more, shorter bands


def test_band_keys_change_only_in_the_band_that_changes():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2**32, size=(1, 20), dtype=np.uint64).astype(np.uint32)
    other = sig.copy()
    other[0, 7] ^= 1                     # row 7 lies in band 1 when rows = 5
    k1, k2 = band_keys(sig, 4, 5), band_keys(other, 4, 5)
    assert k1.dtype == np.int64 and k1.shape == (1, 4)
    assert (k1 != k2).tolist() == [[False, True, False, False]]
    same = np.tile(sig[:, :5], (1, 4))   # identical values in every band still give distinct keys
    assert len(set(band_keys(same, 4, 5)[0].tolist())) == 4
    with pytest.raises(ValueError):
        band_keys(sig, 5, 5)


def test_bucket_pairs_all_pairs_for_small_buckets_star_for_large():
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 60, 500)
    ids = rng.permutation(100_000)[:500].astype(np.int64)
    a, b = bucket_pairs(keys, ids, 8)
    groups = defaultdict(list)
    for k, i in zip(keys.tolist(), ids.tolist()):
        groups[k].append(i)
    expected = set()
    for members in groups.values():
        members.sort()
        if len(members) <= 8:
            expected |= set(itertools.combinations(members, 2))
        else:
            expected |= {(members[0], m) for m in members[1:]}
    assert set(zip(a.tolist(), b.tolist())) == expected
    assert np.all(a < b)
    assert bucket_pairs(np.array([1]), np.array([5]), 8)[0].size == 0


def test_pair_scores_from_a_contingency_table():
    truth = {1: {"kind": "original", "cluster": 0}, 2: {"kind": "exact", "cluster": 0},
             3: {"kind": "near", "cluster": 0}, 4: {"kind": "original", "cluster": 1},
             5: {"kind": "bad", "cluster": None}, 6: {"kind": "original", "cluster": 2}}
    perfect = score_clusters({1: "x", 2: "x", 3: "x", 4: "y", 6: "z", 5: "x"}, truth)
    assert perfect.f1 == 1.0 and perfect.true_pairs == 3 and perfect.merged_originals == 0
    partial = score_clusters({1: "x", 2: "x", 3: "y", 4: "y"}, truth)   # 6 missing: a singleton
    assert (partial.correct_pairs, partial.predicted_pairs, partial.true_pairs) == (1, 2, 3)
    assert partial.precision == 0.5 and partial.recall == pytest.approx(1 / 3)
    assert partial.merged_originals == 1
    assert (partial.exact_found, partial.near_found) == (1, 0)
