"""Reading a shard directory for the trainer: :class:`ShardDataset` yields ``input_ids`` and
Dolly's ``labels`` (``-100`` up to and including ``### Response:\\n``), :func:`collate` pads a
batch."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from dollyflow.core.shards.manifest import TOKENIZER_DIR, read_manifest
from dollyflow.core.shards.shard_file import SHARD_SCHEMA, read_table
from dollyflow.core.storage import join
from dollyflow.core.tokens import IGNORE_INDEX


def labels_array(input_ids: np.ndarray, response_start: int) -> np.ndarray:
    """A record's labels: its ids (int64) with ``-100`` before ``response_start``."""
    labels = np.array(input_ids, dtype=np.int64, copy=True)
    labels[:response_start] = IGNORE_INDEX
    return labels


class ShardDataset:
    """Records of one split of a shard directory, as ``{"input_ids", "labels", "record_id",
    "length"}`` (numpy int64 arrays). Map-style (``len``, ``[i]``: usable as a torch Dataset) and
    iterable (streams shard by shard). ``rank``/``world_size`` pick every ``world_size``-th shard
    for data-parallel readers."""

    def __init__(self, directory: str | Path, split: str = "train", rank: int = 0, world_size: int = 1):
        self.directory = str(directory)
        self.manifest = read_manifest(self.directory)
        if split not in self.manifest["splits"]:
            raise KeyError(f"{directory}: no split {split!r} (have {sorted(self.manifest['splits'])})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.split = split
        self.shards = self.manifest["splits"][split]["shards"][rank::world_size]
        self._records = sum(s["records"] for s in self.shards)
        self._index = None

    @property
    def tokenizer_dir(self) -> str:
        return join(self.directory, TOKENIZER_DIR)

    def __len__(self) -> int:
        return self._records

    def _tables(self) -> Iterator[pa.Table]:
        for s in self.shards:
            yield read_table(join(self.directory, s["file"]))

    @staticmethod
    def _example(record_id, ids: np.ndarray, start: int) -> dict:
        ids = ids.astype(np.int64)
        return {"record_id": record_id, "input_ids": ids, "labels": labels_array(ids, start),
                "length": int(len(ids))}

    def __iter__(self) -> Iterator[dict]:
        for t in self._tables():
            col = t.column("input_ids").combine_chunks()
            values = col.values.to_numpy()
            offsets = col.offsets.to_numpy()
            starts = t.column("response_start").to_numpy()
            rids = t.column("record_id").to_pylist()
            for i in range(t.num_rows):
                yield self._example(rids[i], values[offsets[i]:offsets[i + 1]], int(starts[i]))

    def _load(self):
        if self._index is None:
            tables = list(self._tables())
            t = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
            col = t.column("input_ids").combine_chunks()
            self._index = (col.values.to_numpy(), col.offsets.to_numpy(),
                           t.column("response_start").to_numpy(), t.column("record_id").to_pylist())
        return self._index

    def arrays(self) -> dict:
        """This reader's records as flat columns, for trainers that batch by index: ``values``
        (all input ids, int32) with ``offsets`` (record i is ``values[offsets[i]:offsets[i+1]]``),
        ``response_start`` and ``length`` (int64), ``category`` and ``record_id`` (lists)."""
        tables = list(self._tables())
        t = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
        col = t.column("input_ids").combine_chunks()
        return {"values": col.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
                "offsets": col.offsets.to_numpy().astype(np.int64),
                "response_start": t.column("response_start").to_numpy().astype(np.int64),
                "length": t.column("length").to_numpy().astype(np.int64),
                "category": [c or "" for c in t.column("category").to_pylist()],
                "record_id": t.column("record_id").to_pylist()}

    def __getitem__(self, i: int) -> dict:
        values, offsets, starts, rids = self._load()
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._example(rids[i], values[offsets[i]:offsets[i + 1]], int(starts[i]))


def collate(examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad a batch: ``input_ids`` with ``pad_token_id`` (= eos), ``labels`` with -100,
    plus ``attention_mask``. Returns numpy int64 arrays (``torch.from_numpy`` them)."""
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(examples), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = e["input_ids"]
        labels[r, :n] = e["labels"]
        mask[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
