"""Token-balanced shard planning: which shard of its split each record goes to (numpy only).

Each split's shards are contiguous ranges of (split key, record id), in shard order, balanced by
tokens (:func:`plan_shards`: every shard's tokens within one record of the mean; records inside a
shard ordered by split key). Split keys are hashes, so every shard is a uniform sample of its
split. (Before 2026-11-25 the plan was greedy longest-first, max - min <= one record; the files
and the manifest are the same either way.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def shard_count(num_shards: int, records: int) -> int:
    """Shards actually written for a split: ``num_shards``, but never more than its records."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return max(1, min(int(num_shards), int(records)))


def plan_shards(lengths: Sequence[int], keys: Sequence[int], num_shards: int,
                record_ids: Sequence[str] | None = None) -> np.ndarray:
    """Shard index of each record, balancing tokens with contiguous ranges: records ordered by
    (split key, record id) are cut into ``n`` runs, each cut at the record boundary nearest to
    ``k/n`` of the split's tokens, every shard non-empty. A shard is thus a range of split keys
    (a hash, so a uniform sample of the split), which lets the Spark job assign shards with a
    column expression instead of joining every record with a plan (:func:`shard_starts`).
    Deterministic; each shard's tokens are within one record (the longest) of the mean."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.int64)
    n = shard_count(num_shards, len(lengths))
    out = np.zeros(len(lengths), dtype=np.int32)
    if len(lengths) == 0:
        return out
    order = _key_order(keys, record_ids)
    prefix = np.concatenate([[0], np.cumsum(lengths[order])])     # tokens before position i
    total, m = int(prefix[-1]), len(lengths)
    cuts, prev = [], 0
    for k in range(1, n):
        target = total * k / n
        i = int(np.searchsorted(prefix, target))
        if i > 0 and (i > m or abs(prefix[i - 1] - target) <= abs(prefix[i] - target)):
            i -= 1                                                  # the nearer boundary (ties: the earlier)
        i = min(max(i, prev + 1), m - (n - k))                      # every shard keeps >= 1 record
        cuts.append(i)
        prev = i
    shard_of_position = np.zeros(m, dtype=np.int32)
    for c in cuts:
        shard_of_position[c:] += 1
    out[order] = shard_of_position
    return out


def _key_order(keys: np.ndarray, record_ids: Sequence[str] | None) -> np.ndarray:
    """Positions in (split key, record id) order (record ids only break the rare tie of keys)."""
    if record_ids is None:
        return np.argsort(keys, kind="stable")
    return np.lexsort((np.asarray(record_ids, dtype=object).astype(str), keys))


def shard_starts(plan: np.ndarray, keys: Sequence[int], record_ids: Sequence[str]) -> list[tuple[int, str]]:
    """The first (split key, record id) of shards 1..n-1 of a :func:`plan_shards` plan: a record
    belongs to the number of starts at or below its (key, id)."""
    plan = np.asarray(plan)
    keys = np.asarray(keys, dtype=np.int64)
    order = _key_order(keys, record_ids)
    starts = []
    for s in range(1, int(plan.max()) + 1 if len(plan) else 0):
        first = order[np.argmax(plan[order] == s)]
        starts.append((int(keys[first]), str(record_ids[first])))
    return starts
