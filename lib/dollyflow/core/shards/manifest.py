"""The manifest of a shard directory (``manifest.json``): building it from the shards' stats,
writing and reading it, and its sha256 (the shards' identity in summaries, run rows and model
fingerprints).

A shard directory holds::

    manifest.json                      what the shards hold (see :func:`build_manifest`)
    tokenizer/                         the exact tokenizer used (load_tokenizer(dir/"tokenizer"))
    train-00000-of-00008.parquet ...   record_id, category, input_ids list<int32>,
    test-00000-of-00001.parquet  ...   response_start int32, length int32
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from dollyflow.core.storage import join, read_bytes, write_bytes

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "dollyflow-shards"
FORMAT_VERSION = 1


def merge_stats(shards: Iterable[dict]) -> dict:
    """Totals of a split from its shards' stats (shards listed in file order)."""
    shards = sorted(shards, key=lambda s: s["file"])
    total = {"records": 0, "tokens": 0, "label_tokens": 0, "categories": {}, "length_histogram": None,
             "shards": []}
    for s in shards:
        total["records"] += s["records"]
        total["tokens"] += s["tokens"]
        total["label_tokens"] += s["label_tokens"]
        for c, d in s["categories"].items():
            t = total["categories"].setdefault(c, {"records": 0, "tokens": 0})
            t["records"] += d["records"]
            t["tokens"] += d["tokens"]
        h = s["length_histogram"]
        total["length_histogram"] = (list(h) if total["length_histogram"] is None else
                                     [a + b for a, b in zip(total["length_histogram"], h)])
        total["shards"].append({k: s[k] for k in ("file", "records", "tokens", "bytes", "sha256")})
    total["categories"] = dict(sorted(total["categories"].items()))
    return total


def build_manifest(*, source: dict, tokenizer: dict, max_length: int, seed: int, test_size: float,
                   edges: Sequence[int], split_shards: dict[str, list[dict]], drops: dict[str, int],
                   run_id: str = "", prompt_format: str = "dolly") -> dict:
    """The manifest: source table and version, tokenizer (name, sha256 of its files, special
    ids), max_length, split settings, drops per reason and, per split, record/token counts per
    category, the length histogram and the shard files with their sha256."""
    splits = {name: merge_stats(shards) for name, shards in sorted(split_shards.items())}
    for s in splits.values():
        s["length_histogram"] = {"edges": list(edges),
                                 "counts": s["length_histogram"] or [0] * (len(edges) - 1)}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_id": run_id,
        "source": source, "tokenizer": tokenizer, "prompt_format": prompt_format,
        "max_length": int(max_length), "seed": int(seed), "test_size": test_size,
        "drops": dict(sorted(drops.items())),
        "records": sum(s["records"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "splits": splits,
    }


def write_manifest(directory: str, manifest: dict) -> None:
    """Write ``<directory>/manifest.json`` (indented JSON)."""
    write_bytes(join(str(directory), MANIFEST), json.dumps(manifest, indent=2).encode("utf-8"))


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a shard directory; ValueError when it is not a dollyflow one."""
    m = json.loads(read_bytes(join(str(directory), MANIFEST)))
    if m.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a dollyflow shard directory (format={m.get('format')!r})")
    return m


def manifest_sha256(directory: str | Path) -> str:
    """The sha256 of ``<directory>/manifest.json`` as stored: the identity of a shard directory
    (the tokenize summary and ``tokenize_runs``, the pointer, the train fingerprint and the
    default output directory's name)."""
    return hashlib.sha256(read_bytes(join(str(directory), MANIFEST))).hexdigest()
