"""Benchmark decontamination: word n-grams of benchmark items, and the check of a record's text
against them.

Text is normalised (NFC, case-fold, whitespace collapsed) and split into words (runs of word
characters); an n-gram is ``n`` consecutive words, hashed to 64 bits (xxh3). An item with fewer
than ``n`` words but at least ``max(8, n // 2)`` contributes its whole word sequence as one gram
(short benchmark questions would otherwise never match); shorter items are skipped (counted).
The index is two sorted numpy arrays (gram hashes, item number), small enough to broadcast once:
about 16 bytes per distinct n-gram. A record matches when any of its grams (of each length the
index holds) is in the index; the item it matched is reported.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import xxhash

from dollyflow.config.errors import ConfigError
from dollyflow.core.filtering.quality import words_of
from dollyflow.core.storage import read_bytes
from dollyflow.core.text import normalize


def _hash(words: list[str]) -> int:
    return xxhash.xxh3_64_intdigest(" ".join(words).encode("utf-8")) - (1 << 63)   # signed int64 range


def min_item_words(n: int) -> int:
    return min(n, max(8, n // 2))


def grams(words: list[str], size: int) -> list[int]:
    return [_hash(words[i:i + size]) for i in range(len(words) - size + 1)]


@dataclass
class BenchmarkIndex:
    hashes: np.ndarray            # sorted int64 gram hashes
    items: np.ndarray             # item number of each hash (the first item holding it)
    sizes: tuple[int, ...]        # gram lengths present
    refs: list[str]               # item number -> "file#row (field)"
    texts: list[str] = field(default_factory=list)   # item number -> its text (first 200 chars)
    files: list[dict] = field(default_factory=list)  # per file: path, sha256, rows, items, skipped_short

    def match(self, text: str | None) -> tuple[int, str] | None:
        """(item number, the matching words) of the first gram of ``text`` in the index, or None."""
        if not text or self.hashes.size == 0:
            return None
        words = words_of(normalize(text))
        for size in self.sizes:
            if len(words) < size:
                continue
            hs = np.fromiter(grams(words, size), dtype=np.int64, count=len(words) - size + 1)
            pos = np.searchsorted(self.hashes, hs)
            pos[pos >= self.hashes.size] = 0
            hit = np.flatnonzero(self.hashes[pos] == hs)
            if hit.size:
                i = int(hit[0])
                return int(self.items[pos[i]]), " ".join(words[i:i + size])
        return None


def _rows(path: str, key: str) -> tuple[list[dict], bytes]:
    """The rows of a JSON Lines or Parquet benchmark file, and its bytes."""
    try:
        data = read_bytes(path)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"{key}: benchmark file {path!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if path.endswith(".parquet") or data[:4] == b"PAR1":
        return pq.read_table(io.BytesIO(data)).to_pylist(), data
    rows = []
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: {path} line {i} is not JSON ({exc}); benchmark files are JSON Lines "
                                  "or Parquet") from None
    return rows, data


def build_index(paths: list[str], fields: list[str], n: int, key: str = "filter.decontaminate") -> BenchmarkIndex:
    """The n-gram index of every item (row x field present) of the benchmark files."""
    hashes: dict[int, int] = {}
    refs, texts, files = [], [], []
    sizes: set[int] = set()
    floor = min_item_words(n)
    for path in paths:
        if not path.startswith(("s3", "gs:", "abfs", "hdfs:", "dbfs:")) and not os.path.exists(path):
            raise ConfigError(f"{key}: benchmark file {path!r} does not exist")
        rows, data = _rows(path, key)
        used = [f for f in fields if any(isinstance(r.get(f), str) for r in rows)]
        if rows and not used:
            raise ConfigError(f"{key}: {path} has none of the fields filter.decontaminate_fields names "
                              f"({', '.join(fields)}); its fields: {', '.join(sorted(rows[0]))}")
        items = skipped = 0
        for row_no, row in enumerate(rows):
            for f in used:
                text = row.get(f)
                if not isinstance(text, str):
                    continue
                words = words_of(normalize(text))
                if len(words) < floor:
                    skipped += 1
                    continue
                size = min(n, len(words))
                sizes.add(size)
                item = len(refs)
                refs.append(f"{os.path.basename(path)}#{row_no} ({f})")
                texts.append(text[:200])
                items += 1
                for h in grams(words, size):
                    hashes.setdefault(h, item)
        sha = hashlib.sha256(data).hexdigest()
        files.append({"path": path, "sha256": sha, "rows": len(rows), "items": items, "skipped_short": skipped})
    keys = np.fromiter(hashes.keys(), dtype=np.int64, count=len(hashes))
    vals = np.fromiter(hashes.values(), dtype=np.int64, count=len(hashes))
    order = np.argsort(keys)
    return BenchmarkIndex(keys[order], vals[order], tuple(sorted(sizes, reverse=True)), refs, texts, files)

