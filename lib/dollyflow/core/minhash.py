"""MinHash signatures, LSH banding parameters and band keys (engine-free, numpy-vectorised).

Hash family: each of the ``num_perm`` "permutations" is an affine map ``h_p(x) = a_p * x + b_p``
modulo 2**32 with ``a_p`` odd (a bijection of 32-bit values), applied to 32-bit shingle hashes
that are already well mixed (see :mod:`dollyflow.core.text`). The signature of a document is the
element-wise minimum over its shingles; the share of equal positions of two signatures estimates
the Jaccard similarity of the shingle sets.

Signatures are computed for a whole batch of documents as a (num_perm x shingles) matrix in
blocks that fit in cache, reduced per document with ``np.minimum.reduceat``; there is no Python
loop per shingle or per document.

Near duplicates compare two signatures per record, one of its instruction+response shingles and
one of its context shingles (:func:`part_similarity`); only the first is banded.

Banding: ``optimal_bands`` picks (bands, rows) with bands*rows <= num_perm minimising the weighted
false-positive and false-negative areas under the LSH S-curve, as datasketch's ``_optimal_param``
does (same objective, integrated numerically with numpy).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dollyflow.core.text import splitmix64

EMPTY = np.uint32(0xFFFFFFFF)
_BLOCK_SHINGLES = 4096
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Permutations:
    """The affine hash family: ``a`` (odd) and ``b``, uint32 arrays of length num_perm."""

    a: np.ndarray
    b: np.ndarray

    @property
    def num_perm(self) -> int:
        return int(self.a.size)


def permutations(num_perm: int, seed: int = 1) -> Permutations:
    """Deterministic hash family for ``num_perm`` permutations from ``seed``."""
    if num_perm < 1:
        raise ValueError("num_perm must be >= 1")
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return Permutations(a=a, b=b)


def signatures(shingles: np.ndarray, docs: np.ndarray, n_docs: int, perms: Permutations) -> np.ndarray:
    """MinHash signatures, shape (n_docs, num_perm) uint32.

    ``shingles`` (uint32) and ``docs`` (doc index per shingle, non-decreasing) come from
    :func:`dollyflow.core.text.batch_shingles`. Documents without shingles get all-``EMPTY`` rows.
    """
    out = np.full((n_docs, perms.num_perm), EMPTY, dtype=np.uint32)
    if shingles.size == 0:
        return out
    if np.any(docs[1:] < docs[:-1]):
        raise ValueError("docs must be sorted")
    a = perms.a[:, None]
    b = perms.b[:, None]
    # Segment starts (one per document that has shingles).
    seg_start = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
    seg_doc = docs[seg_start]
    # Cut the shingle array into blocks at segment boundaries near multiples of the block size.
    idx = np.searchsorted(seg_start, np.arange(0, shingles.size, _BLOCK_SHINGLES))
    cuts = np.unique(seg_start[idx[idx < seg_start.size]])
    cuts = np.r_[cuts, shingles.size]
    buf = np.empty((perms.num_perm, min(shingles.size, 2 * _BLOCK_SHINGLES + 1)), dtype=np.uint32)
    out_t = np.empty((perms.num_perm, seg_start.size), dtype=np.uint32)
    with np.errstate(over="ignore"):
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            width = hi - lo
            if buf.shape[1] < width:  # one very long document
                buf = np.empty((perms.num_perm, width), dtype=np.uint32)
            view = buf[:, :width]
            np.multiply(a, shingles[None, lo:hi], out=view)
            np.add(view, b, out=view)
            s0, s1 = np.searchsorted(seg_start, [lo, hi])
            out_t[:, s0:s1] = np.minimum.reduceat(view, seg_start[s0:s1] - lo, axis=1)
    out[seg_doc] = out_t.T
    return out


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity: share of equal positions (row-wise for 2-D inputs)."""
    return np.mean(np.asarray(sig_a) == np.asarray(sig_b), axis=-1)


def _integrate(f, lo: float, hi: float, steps: int = 2001) -> float:
    """Composite Simpson integral of a vectorised function on [lo, hi]."""
    if hi <= lo:
        return 0.0
    x = np.linspace(lo, hi, steps)
    y = f(x)
    h = (hi - lo) / (steps - 1)
    return float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


@lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
                  false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted error areas.

    The probability that two documents with Jaccard ``s`` share at least one band is
    ``1 - (1 - s**rows)**bands``; the false-positive area is its integral over [0, threshold],
    the false-negative area the integral of its complement over [threshold, 1].
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError("threshold must be in (0, 1)")
    best, best_err = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _integrate(lambda s: 1 - (1 - s ** rows) ** bands, 0.0, threshold)
            fn = _integrate(lambda s: (1 - s ** rows) ** bands, threshold, 1.0)
            err = fp * false_positive_weight + fn * false_negative_weight
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One signed 64-bit key per (document, band), shape (n_docs, bands) int64.

    The key hashes the band's ``rows`` signature values together with the band index, so keys
    of different bands do not collide (up to 64-bit hash collisions).
    """
    if bands * rows > sigs.shape[1]:
        raise ValueError(f"bands*rows={bands * rows} exceeds num_perm={sigs.shape[1]}")
    n = sigs.shape[0]
    keys = np.empty((n, bands), dtype=np.uint64)
    weights = np.array([(0xC2B2AE3D27D4EB4F * (2 * k + 1)) & _MASK64 for k in range(rows)], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(bands):
            block = sigs[:, j * rows:(j + 1) * rows].astype(np.uint64)
            acc = (block * weights[None, :]).sum(axis=1, dtype=np.uint64)
            acc += np.uint64((0x165667B19E3779F9 * (j + 1)) & _MASK64)
            keys[:, j] = splitmix64(acc)
    return keys.view(np.int64)


def compact(sigs: np.ndarray) -> np.ndarray:
    """b-bit minwise hashing with b=16: keep the low 16 bits of every signature value.

    Halves storage and shuffle size for verification. Two different minima agree on 16 bits
    with probability 2**-16, so :func:`estimate_jaccard_compact` corrects for that.
    """
    return (sigs & np.uint32(0xFFFF)).astype(np.uint16)


def estimate_jaccard_compact(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Jaccard estimate from 16-bit compact signatures (b-bit estimator, clipped to [0, 1])."""
    c = 2.0 ** -16
    raw = np.mean(np.asarray(sig_a) == np.asarray(sig_b), axis=-1)
    return np.clip((raw - c) / (1.0 - c), 0.0, 1.0)


def part_similarity(qa_a: np.ndarray, qa_b: np.ndarray, ctx_a: np.ndarray, ctx_b: np.ndarray,
                    has_ctx_a: np.ndarray, has_ctx_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise estimated Jaccard of the two parts of record pairs, from compact signatures.

    Returns (qa, context): qa from the instruction+response signatures; context from the context
    signatures where both records have a context, 1.0 where neither has one (both empty: the
    same, absent passage) and 0.0 where only one has. Context rows of a record without context
    are ignored. The near-duplicate rule of :mod:`dollyflow.engine.dedupe` is
    ``min(qa, context) >= threshold``.
    """
    qa = estimate_jaccard_compact(qa_a, qa_b) if len(qa_a) else np.zeros(0)
    has_a, has_b = np.asarray(has_ctx_a, dtype=bool), np.asarray(has_ctx_b, dtype=bool)
    ctx = np.where(has_a == has_b, 1.0, 0.0)
    both = np.flatnonzero(has_a & has_b)
    if both.size:
        ctx[both] = estimate_jaccard_compact(np.asarray(ctx_a)[both], np.asarray(ctx_b)[both])
    return qa, ctx


def bucket_pairs(keys: np.ndarray, nids: np.ndarray, all_pairs_bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (a, b), a < b, of ids sharing a key (one row per (key, id) occurrence).

    A bucket (all ids with one key) of 2..``all_pairs_bucket`` members yields all its pairs; a
    larger one a star from its smallest id to every other member (its pairs are verified only
    against that member). Pairs may repeat across keys. Vectorised: one lexsort, then run
    arithmetic per offset d < all_pairs_bucket (no Python loop per bucket).
    """
    if keys.size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((nids, keys))
    k, v = keys[order], nids[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    lengths = np.diff(np.r_[starts, k.size])
    run_len = np.repeat(lengths, lengths)
    run_start = np.repeat(starts, lengths)
    pos = np.arange(k.size)
    out_a, out_b = [], []
    # Small buckets: every pair (i, i + d) inside the run, for d = 1 .. all_pairs_bucket - 1.
    small = (run_len >= 2) & (run_len <= all_pairs_bucket)
    for d in range(1, all_pairs_bucket):
        i = pos[:-d][small[:-d] & (pos[:-d] + d < run_start[:-d] + run_len[:-d])]
        out_a.append(v[i])
        out_b.append(v[i + d])
    # Large buckets: a star on the smallest node id (the run's first element after sorting).
    large = (run_len > all_pairs_bucket) & (pos != run_start)
    out_a.append(v[run_start[large]])
    out_b.append(v[large])
    a, b = np.concatenate(out_a), np.concatenate(out_b)
    keep = a != b
    return a[keep], b[keep]


def signatures_from_buffer(buffer, n: int, num_perm: int, dtype=np.uint16) -> np.ndarray:
    """(n, num_perm) array from a contiguous buffer of n little-endian signatures."""
    if n == 0:
        return np.zeros((0, num_perm), dtype=dtype)
    return np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<"),
                         count=n * num_perm).reshape(n, num_perm).astype(dtype)
