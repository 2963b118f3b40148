"""Verifying a shard directory against its manifest: every shard's sha256 and recomputed stats,
the totals per split and the tokenizer files."""
from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dollyflow.core.shards.manifest import TOKENIZER_DIR, merge_stats, read_manifest
from dollyflow.core.shards.shard_file import shard_stats
from dollyflow.core.storage import join, list_dir, read_bytes


def _tokenizer_digest(tok_dir: str) -> str | None:
    """The combined sha256 of a tokenizer directory, as :func:`dollyflow.core.tokens.tokenizer_sha256` computes it
    (for local paths and URIs alike); None when the directory has no files."""
    files = {name: hashlib.sha256(read_bytes(join(tok_dir, name))).hexdigest()
             for name, is_dir in list_dir(tok_dir) if not is_dir}
    if not files:
        return None
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


#: The columns :func:`shard_stats` reads; the token ids are covered by the file's sha256.
STATS_COLUMNS = ["category", "response_start", "length"]


def _check_shard(directory: str, entry: dict, edges: Sequence[int]) -> tuple[dict | None, list[str]]:
    """(stats, problems) of one shard file against its manifest entry: the sha256 of all its
    bytes, and the stats recomputed from its narrow columns (the ids are covered by the hash)."""
    path = join(directory, entry["file"])
    try:
        data = read_bytes(path)
    except (FileNotFoundError, OSError):
        return None, [f"{entry['file']}: missing"]
    problems = []
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        problems.append(f"{entry['file']}: sha256 differs from the manifest")
    try:
        stats = shard_stats(pq.read_table(io.BytesIO(data), columns=STATS_COLUMNS), edges)
    except (OSError, pa.ArrowException) as exc:
        return None, problems + [f"{entry['file']}: unreadable ({exc})"]
    stats.update(file=entry["file"], bytes=len(data), sha256=digest)
    return stats, problems


def verify_shards(directory: str | Path, threads: int = 8) -> list[str]:
    """Check a shard directory against its manifest (file sha256, records, tokens, categories,
    histogram, tokenizer files). Returns the problems found; empty when all match. Shards are
    read and hashed by ``threads`` threads (hashing, Parquet decoding and object-store reads
    release the GIL)."""
    directory = str(directory)
    m = read_manifest(directory)
    problems = []
    jobs = [(split, entry, s["length_histogram"]["edges"]) for split, s in m["splits"].items() for entry in s["shards"]]
    with ThreadPoolExecutor(max(1, min(int(threads), len(jobs) or 1))) as pool:
        checked = list(pool.map(lambda j: _check_shard(directory, j[1], j[2]), jobs))
    got: dict[str, list[dict]] = {split: [] for split in m["splits"]}
    for (split, _, _), (stats, found) in zip(jobs, checked):
        problems += found
        if stats is not None:
            got[split].append(stats)
    for split, s in m["splits"].items():
        merged = merge_stats(got[split])
        for key in ("records", "tokens", "label_tokens", "categories"):
            if merged[key] != s[key]:
                problems.append(f"{split}: {key} in the shards ({merged[key]}) != manifest ({s[key]})")
        if (merged["length_histogram"] or []) != s["length_histogram"]["counts"]:
            problems.append(f"{split}: length histogram differs from the manifest")
    digest = _tokenizer_digest(join(directory, TOKENIZER_DIR))
    if digest is None:
        problems.append("tokenizer/: missing")
    elif digest != m["tokenizer"].get("sha256"):
        problems.append("tokenizer/: sha256 differs from the manifest")
    return problems
