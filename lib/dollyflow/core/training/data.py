"""The trainer's view of a shard directory (engine-free: pyarrow and numpy).

- :class:`Records`: one rank's records as flat arrays (through :class:`ShardDataset`), and
  :meth:`Records.batch` to pad a micro-batch: right padding with eos, labels ``-100`` on the
  prompt (up to and including ``### Response:\\n``, the stored ``response_start``) and on padding,
  width a multiple of 8.
- :func:`rank_records`: rank ``r`` of ``w`` reads every ``w``-th shard; when a split has fewer
  shards than ranks, every rank reads all of them and keeps every ``w``-th record instead.
- :func:`local_dir`: a local copy of a directory on an object store (the tokenizer).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from dollyflow.core.shards import ShardDataset, read_manifest
from dollyflow.core.storage import is_uri, join, list_dir, read_bytes
from dollyflow.core.tokens import IGNORE_INDEX
from dollyflow.core.training.batching import padded_width


class Records:
    """Records held as flat arrays (see :meth:`ShardDataset.arrays`)."""

    def __init__(self, arrays: dict):
        self.values = arrays["values"]
        self.offsets = arrays["offsets"]
        self.response_start = arrays["response_start"]
        self.length = arrays["length"]
        self.category = list(arrays["category"])
        self.record_id = list(arrays["record_id"])

    def __len__(self) -> int:
        return len(self.length)

    def label_tokens(self, idx: Sequence[int]) -> int:
        """Tokens that carry a label in these records (the response and ``### End``; the first
        token of a sequence never does, as nothing predicts it)."""
        idx = np.asarray(idx, dtype=np.int64)
        return int((self.length[idx] - np.maximum(self.response_start[idx], 1)).sum())

    def ids(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def batch(self, idx: Sequence[int], pad_id: int, pad_to_multiple_of: int = 8) -> dict:
        """``input_ids``, ``attention_mask`` and ``labels`` (int64, right-padded) for records ``idx``."""
        idx = [int(i) for i in idx]
        width = padded_width(max(int(self.length[i]) for i in idx), pad_to_multiple_of)
        ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        labels = np.full((len(idx), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for r, i in enumerate(idx):
            n = int(self.length[i])
            row = self.ids(i)
            ids[r, :n] = row
            mask[r, :n] = 1
            s = int(self.response_start[i])
            labels[r, s:n] = row[s:]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def subset(self, keep: Sequence[int]) -> "Records":
        keep = np.asarray(keep, dtype=np.int64)
        pieces = [self.ids(int(i)) for i in keep]
        lengths = self.length[keep]
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Records({"values": np.concatenate(pieces) if pieces else np.zeros(0, np.int32),
                        "offsets": offsets, "response_start": self.response_start[keep], "length": lengths,
                        "category": [self.category[i] for i in keep],
                        "record_id": [self.record_id[i] for i in keep]})


def split_records(shard_dir: str, split: str, rank: int = 0, world_size: int = 1) -> Records:
    """Records of ``split`` for ``rank``: its own shards, or (fewer shards than ranks) every
    ``world_size``-th record of all of them."""
    manifest = read_manifest(shard_dir)
    n_shards = len(manifest["splits"][split]["shards"])
    if n_shards >= world_size:
        return Records(ShardDataset(shard_dir, split, rank, world_size).arrays())
    everything = Records(ShardDataset(shard_dir, split, 0, 1).arrays())
    return everything.subset(range(rank, len(everything), world_size))


def local_dir(path: str, cache_root: str | None = None) -> str:
    """``path`` itself when local (or a FUSE mount); for a URI, a local copy of its files."""
    if not is_uri(path):
        return path
    target = tempfile.mkdtemp(prefix="dollyflow-", dir=cache_root)
    for name, is_dir in list_dir(path):
        if not is_dir:
            Path(target, name).write_bytes(read_bytes(join(path, name)))
    return target


