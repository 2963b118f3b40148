"""Which records go into which micro-batch (numpy only, deterministic).

Training batches are *length-grouped*: the rank's records are shuffled by ``(seed, epoch, rank)``,
cut into buckets of ``group_size`` micro-batches' worth of records, each bucket is sorted by length
and cut into micro-batches (``batch_size`` records, or as many as fit a ``batch_tokens`` budget of
padded tokens), and the micro-batches of all buckets are shuffled. Every record is in exactly one
micro-batch per epoch; the same seed gives the same order on every rerun.

Data-parallel ranks must run the same number of optimizer steps per epoch (a rank that stops
early leaves the others waiting in a collective), but shards are balanced by tokens, not records.
:func:`equalize` brings every rank to the largest rank's count (rounded up to a whole number of
optimizer steps) by **splitting** its largest micro-batches in two: no record is dropped or
repeated. Only when a rank has fewer records than the target count (a tiny split over many ranks)
are micro-batches repeated, from the start of its epoch order.

Evaluation batches (:func:`eval_batches`) are sorted by length and not shuffled.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def padded_width(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (Dolly: 8)."""
    m = max(1, int(multiple))
    return -(-int(length) // m) * m


def _cut(sorted_idx: np.ndarray, lengths: np.ndarray, batch_size: int, batch_tokens: int,
         multiple: int) -> list[np.ndarray]:
    """Cut indices sorted by ascending length into micro-batches: ``batch_size`` records each, or
    greedily as many as keep ``rows x padded width <= batch_tokens`` (a record longer than the
    budget alone gets a batch of its own)."""
    if len(sorted_idx) == 0:
        return []
    if not batch_tokens:
        return [sorted_idx[i:i + batch_size] for i in range(0, len(sorted_idx), batch_size)]
    out, start = [], 0
    for i in range(len(sorted_idx)):
        rows = i - start + 1
        if rows > 1 and rows * padded_width(lengths[sorted_idx[i]], multiple) > batch_tokens:
            out.append(sorted_idx[start:i])
            start = i
    out.append(sorted_idx[start:])
    return out


def bucket_records(lengths: np.ndarray, batch_size: int, batch_tokens: int, group_size: int) -> int:
    """Records per length bucket: ``group_size`` micro-batches' worth (estimated from the mean
    length under a token budget)."""
    if batch_tokens:
        mean = float(np.mean(lengths)) if len(lengths) else 1.0
        per_batch = max(1, int(batch_tokens // max(1.0, mean)))
    else:
        per_batch = batch_size
    return max(1, group_size * per_batch)


def train_batches(lengths: Sequence[int], *, seed: int, epoch: int, rank: int = 0, batch_size: int = 8,
                  batch_tokens: int = 0, pad_to_multiple_of: int = 8, group_size: int = 64) -> list[np.ndarray]:
    """One epoch of length-grouped micro-batches (arrays of record indices) for one rank."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch), int(rank)])
    order = rng.permutation(len(lengths))
    size = bucket_records(lengths, batch_size, batch_tokens, group_size)
    batches: list[np.ndarray] = []
    for b in range(0, len(order), size):
        bucket = order[b:b + size]
        bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
        batches += _cut(bucket, lengths, batch_size, batch_tokens, pad_to_multiple_of)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def equalize(batches: list[np.ndarray], target: int) -> list[np.ndarray]:
    """``target`` micro-batches from ``batches``: split the largest one (first of equals) in two,
    keeping the halves in place, until there are enough; repeat batches from the start only when
    every batch is down to one record. Raises if ``target`` is below the current count."""
    if target < len(batches):
        raise ValueError(f"cannot equalize {len(batches)} micro-batches down to {target}")
    out = [np.asarray(b) for b in batches]
    while len(out) < target:
        sizes = [len(b) for b in out]
        i = int(np.argmax(sizes)) if sizes else 0
        if not sizes or sizes[i] <= 1:
            break
        half = (sizes[i] + 1) // 2
        out[i:i + 1] = [out[i][:half], out[i][half:]]
    base = list(out)
    k = 0
    while len(out) < target:
        if not base:
            raise ValueError("a rank has no training records at all")
        out.append(base[k % len(base)])
        k += 1
    return out


def steps_target(counts: Sequence[int], grad_accum: int) -> int:
    """Micro-batches every rank runs in an epoch: the largest rank's count, rounded up to a
    whole number of optimizer steps."""
    m = max(int(c) for c in counts) if len(counts) else 0
    return -(-m // grad_accum) * grad_accum


def eval_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int = 0,
                 pad_to_multiple_of: int = 8) -> list[np.ndarray]:
    """Evaluation micro-batches: records sorted by length (ties by index), cut like training."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    return _cut(order, lengths, batch_size, batch_tokens, pad_to_multiple_of)


def padding_share(batches: Sequence[np.ndarray], lengths: Sequence[int], pad_to_multiple_of: int = 8) -> float:
    """Padding tokens / all tokens the model sees over ``batches``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = padded = 0
    for b in batches:
        if len(b) == 0:
            continue
        ls = lengths[b]
        real += int(ls.sum())
        padded += len(b) * padded_width(int(ls.max()), pad_to_multiple_of)
    return 1.0 - real / padded if padded else 0.0
