"""The trainer's view of a shard directory (engine-free: pyarrow and numpy).

- :class:`Records`: one rank's records as flat arrays (through :class:`ShardDataset`), and
  :meth:`Records.batch` to pad a micro-batch: right padding with eos, labels ``-100`` on the
  prompt (up to and including ``### Response:\\n``, the stored ``response_start``) and on padding,
  width a multiple of 8.
- :func:`rank_records`: rank ``r`` of ``w`` reads every ``w``-th shard; when a split has fewer
  shards than ranks, every rank reads all of them and keeps every ``w``-th record instead.
- :func:`local_dir`: a local copy of a directory on an object store (the tokenizer).
- :func:`build_shard_dir`: the tokenize job's output for a list of records, without Spark (the
  same core functions: Dolly prompts, drops, hash split, token-balanced shards, manifest), for
  a GPU box without Spark, the benchmark and the core tests.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dollyflow.core.records import record_id
from dollyflow.core.shards import (ShardDataset, build_manifest, histogram_edges, plan_shards, read_manifest,
                                   shard_count, shard_file_name, write_manifest, write_shard)
from dollyflow.core.split import assign_splits, split_keys
from dollyflow.core.storage import is_uri, join, list_dir, read_bytes
from dollyflow.core.tokens import (IGNORE_INDEX, backend_from_json, backend_json, encode_records, load_tokenizer,
                                   save_tokenizer)
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


def build_shard_dir(records: Iterable[dict], tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                    max_length: int = 512, test_size: float = 10, num_shards: int = 2, seed: int = 42,
                    source: dict | None = None) -> dict:
    """Write a shard directory (shards, ``tokenizer/``, ``manifest.json``) for dolly records
    (``instruction``, ``context``, ``response``, ``category``) with the core functions the
    tokenize job uses, without Spark. Returns the manifest."""
    import pyarrow as pa

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = list(records)
    tok = load_tokenizer(str(tokenizer_path))
    tok_info = save_tokenizer(tok, out_dir / "tokenizer")
    tok_info.update(name=str(tokenizer_path), dir="tokenizer")
    backend = backend_from_json(backend_json(tok))
    enc = encode_records(backend, [r["instruction"] for r in recs], [r.get("context") or "" for r in recs],
                         [r["response"] for r in recs], max_length)
    drops: dict[str, int] = {}
    kept = []
    for i, r in enumerate(recs):
        if enc.drop_reason[i]:
            drops[enc.drop_reason[i]] = drops.get(enc.drop_reason[i], 0) + 1
            continue
        rid = record_id(r["instruction"], r.get("context") or "", r["response"], r.get("category") or "")
        kept.append((rid, r.get("category") or "", enc.input_ids[i], enc.response_start[i]))
    splits = assign_splits([k[0] for k in kept], test_size, seed)
    edges = histogram_edges(max_length)
    by_split: dict[str, list[dict]] = {}
    for split in sorted(set(splits)):
        rows = [k for k, s in zip(kept, splits) if s == split]
        lengths = [len(k[2]) for k in rows]
        plan = plan_shards(lengths, split_keys([k[0] for k in rows], seed), num_shards, [k[0] for k in rows])
        count = shard_count(num_shards, len(rows))
        stats = []
        for s in range(count):
            part = [rows[i] for i in range(len(rows)) if plan[i] == s]
            part.sort(key=lambda k: k[0])
            table = pa.table({"record_id": [k[0] for k in part], "category": [k[1] for k in part],
                              "input_ids": [list(k[2]) for k in part],
                              "response_start": [int(k[3]) for k in part],
                              "length": [len(k[2]) for k in part]})
            st = write_shard(table, str(out_dir / shard_file_name(split, s, count)), edges)
            st["split"] = split
            stats.append(st)
        by_split[split] = stats
    manifest = build_manifest(source=source or {"table": "local", "location": "", "version": 0, "backend": "none"},
                              tokenizer=tok_info, max_length=max_length, seed=seed, test_size=test_size,
                              edges=edges, split_shards=by_split, drops=drops, run_id="local")
    write_manifest(str(out_dir), manifest)
    return manifest
