"""The tokenize job's shard directory for records in memory, without Spark: a GPU box without
Spark, the train benchmark and the core tests. The Spark job (:mod:`dollyflow.engine.tokenize`)
and this builder share every step but the distribution: Dolly prompts and drops
(:func:`~dollyflow.core.tokens.encode_records`), the hash split, the token-balanced plan
(:func:`.plan.plan_shards`), the shard files and the manifest.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from dollyflow.core.records import record_id
from dollyflow.core.shards.manifest import build_manifest, write_manifest
from dollyflow.core.shards.plan import plan_shards, shard_count
from dollyflow.core.shards.shard_file import histogram_edges, shard_file_name, write_shard
from dollyflow.core.split import assign_splits, split_keys
from dollyflow.core.prompt_format import encode_records, prompt_tokenizer, provenance as format_provenance
from dollyflow.core.tokens import backend_from_json, backend_json, save_tokenizer


def build_shard_dir(records: Iterable[dict], tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                    max_length: int = 512, test_size: float = 10, num_shards: int = 2, seed: int = 42,
                    source: dict | None = None, prompt_format: str = "dolly", system: str = "") -> dict:
    """Write a shard directory (shards, ``tokenizer/``, ``manifest.json``) for dolly records
    (``instruction``, ``context``, ``response``, ``category``) with the core functions the
    tokenize job uses, without Spark: the same records in the same shards in the same order as
    the job writes for those records and settings (tests/jobs/test_tokenize.py compares them).
    ``prompt_format``/``system``: as ``prompt.format``/``prompt.system``. Returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = list(records)
    tok, fmt = prompt_tokenizer(str(tokenizer_path), prompt_format, system)
    tok_info = save_tokenizer(tok, out_dir / "tokenizer")
    tok_info.update(name=str(tokenizer_path), dir="tokenizer")
    backend = backend_from_json(backend_json(tok))
    enc = encode_records(backend, fmt, [r["instruction"] for r in recs], [r.get("context") or "" for r in recs],
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
        row_keys = split_keys([k[0] for k in rows], seed)
        keys = dict(zip((k[0] for k in rows), row_keys))
        plan = plan_shards(lengths, row_keys, num_shards, [k[0] for k in rows])
        count = shard_count(num_shards, len(rows))
        stats = []
        for s in range(count):
            part = [rows[i] for i in range(len(rows)) if plan[i] == s]
            part.sort(key=lambda k: (keys[k[0]], k[0]))    # the job's order: (split key, record id)
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
                              edges=edges, split_shards=by_split, drops=drops, run_id="local",
                              prompt_format=fmt.name)
    manifest["prompt"] = format_provenance(fmt)
    write_manifest(str(out_dir), manifest)
    return manifest
