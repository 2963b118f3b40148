"""Training shards: planning balanced by tokens, the manifest, a reader for the trainer and an
optional MDS export (engine-free: pyarrow and numpy only, no Spark, no Delta).

A shard directory holds::

    manifest.json                      what the shards hold (see :func:`build_manifest`)
    tokenizer/                         the exact tokenizer used (load_tokenizer(dir/"tokenizer"))
    train-00000-of-00008.parquet ...   record_id, category, input_ids list<int32>,
    test-00000-of-00001.parquet  ...   response_start int32, length int32

The trainer needs only this directory: :class:`ShardDataset` yields ``input_ids`` and Dolly's
``labels`` (``-100`` up to and including ``### Response:\\n``), :func:`collate` pads a batch.

Each split's shards are contiguous ranges of (split key, record id), in shard order, balanced by
tokens (:func:`plan_shards`: every shard's tokens within one record of the mean; records inside a
shard ordered by split key). Split keys are hashes, so every shard is a uniform sample of its
split. (Before 2026-11-25 the plan was greedy longest-first, max - min <= one record; the files
and the manifest are the same either way.)

Shard directories are versioned: each tokenize run writes a new one under a *shards root*
(``<root>/v<silver version>-<run id>/``) and, only once it is complete and verified, switches
the root's pointer file ``LATEST.json`` to it (:func:`write_pointer`, an atomic replace or a
single object PUT). Nothing is deleted or moved before that, so readers always see a complete
set, on object stores as well. :func:`resolve_shard_dir` turns a root or a directory into the
directory to read. Every path here may be local, a FUSE mount or a URI (:mod:`dollyflow.core.storage`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dollyflow.core.storage import filesystem, is_uri, join, list_dir, read_bytes, write_atomic, write_bytes
from dollyflow.core.tokens import IGNORE_INDEX

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
POINTER = "LATEST.json"
FORMAT = "dollyflow-shards"
POINTER_FORMAT = "dollyflow-shards-pointer"
FORMAT_VERSION = 1

SHARD_SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("category", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("response_start", pa.int32()),
    ("length", pa.int32()),
])


# ---------------------------------------------------------------------------------------------
# planning


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


def shard_file_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def histogram_edges(max_length: int) -> list[int]:
    """Half-open bins ``[e[i], e[i+1])``: 0, 64, 128, ... powers of two, then max_length + 1."""
    edges = [0]
    e = 64
    while e <= max_length:
        edges.append(e)
        e *= 2
    if edges[-1] != max_length + 1:
        edges.append(max_length + 1)
    return edges


# ---------------------------------------------------------------------------------------------
# writing one shard and describing it


def shard_stats(table: pa.Table, edges: Sequence[int]) -> dict:
    """Records, tokens, label tokens, per-category counts and the length histogram of a shard."""
    lengths = table.column("length").to_numpy().astype(np.int64)
    starts = table.column("response_start").to_numpy().astype(np.int64)
    cats = table.column("category").to_pylist()
    per_cat: dict[str, dict[str, int]] = {}
    for c, n in zip(cats, lengths.tolist()):
        d = per_cat.setdefault(c if c is not None else "", {"records": 0, "tokens": 0})
        d["records"] += 1
        d["tokens"] += n
    hist = np.histogram(lengths, bins=np.asarray(edges))[0] if len(lengths) else np.zeros(len(edges) - 1)
    return {"records": int(len(lengths)), "tokens": int(lengths.sum()),
            "label_tokens": int((lengths - starts).sum()),
            "categories": dict(sorted(per_cat.items())),
            "length_histogram": [int(x) for x in hist]}


def write_shard(table: pa.Table, path: str, edges: Sequence[int]) -> dict:
    """Write one shard as Parquet; return its stats plus ``bytes`` and ``sha256`` of the file.
    Only ``category`` is dictionary-encoded: token ids spread over a 50k vocabulary, where a
    dictionary costs time and, after zstd, makes the file ~30% larger; record ids are unique."""
    table = table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=["category"])
    data = buf.getvalue()
    write_bytes(path, data)
    stats = shard_stats(table, edges)
    stats.update({"file": path.split("?", 1)[0].rsplit("/", 1)[-1], "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest()})
    return stats


# ---------------------------------------------------------------------------------------------
# manifest


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
    write_bytes(join(str(directory), MANIFEST), json.dumps(manifest, indent=2).encode("utf-8"))


def read_manifest(directory: str | Path) -> dict:
    m = json.loads(read_bytes(join(str(directory), MANIFEST)))
    if m.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a dollyflow shard directory (format={m.get('format')!r})")
    return m


def _read_table(path: str) -> pa.Table:
    fs, p = filesystem(path)
    return pq.read_table(p, filesystem=fs)


def _tokenizer_digest(tok_dir: str) -> str | None:
    """The combined sha256 of a tokenizer directory, as :func:`tokenizer_sha256` computes it
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
    from concurrent.futures import ThreadPoolExecutor

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


# ---------------------------------------------------------------------------------------------
# versioned directories under a shards root


def version_dir_name(silver_version: int, run_id: str) -> str:
    """The directory one tokenize run writes under the shards root."""
    return f"v{int(silver_version)}-{run_id}"


def write_pointer(root: str, shard_dir_name: str, **info) -> dict:
    """Point ``<root>/LATEST.json`` at the complete shard directory ``<root>/<shard_dir_name>``
    (atomically: readers see the old pointer or the new one). ``info`` is recorded with it.

    It never moves back. With ``silver_version`` (and ``started_at``, the run's start as an ISO
    UTC time) in ``info``, a pointer that names shards of a newer silver version of the same
    table, or of the same version from a run that started later, is left as it is: two tokenize
    runs finishing out of order leave the pointer at the newer silver version, and of two runs
    over one version the one started last wins (its settings are the latest asked for). Returns
    the pointer that is current afterwards, with ``moved``: whether it is this one.

    Compare-and-replace is a read, then an atomic write (rename or one PUT), then a read-back that
    writes once more if an older run's pointer landed in between. On a local path or mount the
    three happen under an exclusive lock of ``<root>/.LATEST.lock`` (``fcntl.flock``), so no
    window remains there. On an object store, which offers no lock or compare-and-swap, what
    remains is the window between another run's read and its write (milliseconds): two runs
    finishing within it can still leave the older one's pointer; a caller that needs certainty
    checks the pointer afterwards, as the job does."""
    pointer = {"format": POINTER_FORMAT, "dir": shard_dir_name,
               "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info}
    path = join(root, POINTER)
    with _pointer_lock(root):
        for _ in range(2):
            current = _pointer_or_none(root)
            if current is not None and current.get("dir") != shard_dir_name and _newer(current, pointer):
                return {**current, "moved": False}
            if current is not None and current.get("dir") == shard_dir_name:
                break
            write_atomic(path, json.dumps(pointer, indent=2).encode("utf-8"))
    return {**pointer, "moved": True}


@contextmanager
def _pointer_lock(root: str):
    """An exclusive lock of the root's pointer on a local path or mount; nothing on object stores."""
    if is_uri(root):
        yield
        return
    import fcntl
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".LATEST.lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pointer_or_none(root: str) -> dict | None:
    try:
        return read_pointer(root)
    except ValueError:          # unreadable or not ours: replaced
        return None


def _newer(a: dict, b: dict) -> bool:
    """Whether pointer ``a`` names shards newer than ``b``'s: a higher silver version of the same
    silver table, or the same version from a run started later. Pointers that do not both
    record a silver version (older ones, or written by hand), or that name different tables,
    are not ordered: the later write wins."""
    va, vb = a.get("silver_version"), b.get("silver_version")
    if va is None or vb is None or a.get("silver") != b.get("silver"):
        return False
    return (int(va), str(a.get("started_at") or "")) > (int(vb), str(b.get("started_at") or ""))


def read_pointer(root: str) -> dict | None:
    """The root's pointer, or None when it has none."""
    try:
        data = read_bytes(join(str(root), POINTER))
    except (FileNotFoundError, OSError):
        return None
    pointer = json.loads(data)
    if pointer.get("format") != POINTER_FORMAT:
        raise ValueError(f"{root}/{POINTER}: not a dollyflow shards pointer")
    return pointer


def resolve_shard_dir(path: str | Path) -> str:
    """The shard directory to read for ``path``: ``path`` itself when it holds a manifest, else
    the directory its ``LATEST.json`` points to (relative names resolve against ``path``, so a
    root can be copied or moved whole)."""
    path = str(path)
    try:
        read_bytes(join(path, MANIFEST))
        return path
    except (FileNotFoundError, OSError):
        pass
    pointer = read_pointer(path)
    if pointer is None:
        raise FileNotFoundError(f"{path}: neither a shard directory ({MANIFEST}) nor a shards root "
                                f"({POINTER}); run the tokenize job first")
    d = pointer["dir"]
    return d if (is_uri(d) or d.startswith("/")) else join(path, d)


def shard_versions(root: str) -> list[str]:
    """Names of the versioned shard directories under ``root`` (complete or not), sorted."""
    return [name for name, is_dir in list_dir(root) if is_dir and name.startswith("v")]


def shard_settings(*, tokenizer_sha256: str, max_length: int, test_size: float, seed: int, num_shards: int,
                   prompt_format: str = "dolly") -> dict:
    """Everything besides the source version that decides a shard directory's content; kept in
    the manifest (``settings``) so a re-run can tell whether it would build the same shards."""
    return {"tokenizer_sha256": tokenizer_sha256, "max_length": int(max_length), "test_size": float(test_size),
            "seed": int(seed), "num_shards": int(num_shards), "prompt_format": prompt_format,
            "format_version": FORMAT_VERSION}


def unchanged_shards(root: str, source_location: str, source_version: int, settings: dict) -> dict | None:
    """The manifest of the directory ``root``'s pointer names when it was built from the same
    source table and version with the same :func:`shard_settings` (``_dir`` holds the directory),
    else None (no pointer, an unreadable manifest, anything different)."""
    try:
        if read_pointer(root) is None:
            return None
        directory = resolve_shard_dir(root)
        m = read_manifest(directory)
    except (FileNotFoundError, OSError, ValueError):
        return None
    src = m.get("source", {})
    if (src.get("location"), src.get("version")) != (source_location, int(source_version)):
        return None
    if m.get("settings") != settings:
        return None
    return {**m, "_dir": directory}


# ---------------------------------------------------------------------------------------------
# reading, for the trainer


def labels_array(input_ids: np.ndarray, response_start: int) -> np.ndarray:
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
            yield _read_table(join(self.directory, s["file"]))

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


# ---------------------------------------------------------------------------------------------
# Mosaic Streaming (optional)


def mds_available() -> bool:
    try:
        import streaming  # noqa: F401
    except Exception:  # ImportError, or its own imports (torchvision) failing
        return False
    return True


def export_mds(directory: str | Path, out_dir: str | Path | None = None,
               splits: Sequence[str] | None = None) -> dict[str, str]:
    """Write each split of a shard directory as a Mosaic Streaming (MDS) dataset under
    ``out_dir/<split>`` (default ``<directory>/mds``). Columns: input_ids (ndarray:int32),
    response_start and length (int32), record_id and category (str). Needs the
    ``mosaicml-streaming`` package; raises a clear error when it cannot be imported."""
    try:
        from streaming import MDSWriter
    except Exception as exc:  # pragma: no cover - depends on the optional package
        raise RuntimeError("MDS export needs the mosaicml-streaming package (pip install "
                           f"mosaicml-streaming); it could not be imported: {exc}") from exc
    directory = Path(directory)
    out_root = Path(out_dir) if out_dir else directory / "mds"
    manifest = read_manifest(directory)
    columns = {"record_id": "str", "category": "str", "input_ids": "ndarray:int32",
               "response_start": "int32", "length": "int32"}
    written = {}
    for split in splits or sorted(manifest["splits"]):
        target = out_root / split
        with MDSWriter(out=str(target), columns=columns, compression="zstd") as w:
            for entry in manifest["splits"][split]["shards"]:
                t = _read_table(join(str(directory), entry["file"]))
                for row in t.to_pylist():
                    w.write({"record_id": row["record_id"], "category": row["category"] or "",
                             "input_ids": np.asarray(row["input_ids"], dtype=np.int32),
                             "response_start": int(row["response_start"]), "length": int(row["length"])})
        written[split] = str(target)
    return written


def prune_versions(root: str, keep: int, protect: Sequence[str] = ()) -> list[str]:
    """Remove complete shard versions under ``root`` beyond the ``keep`` newest (by manifest
    ``created_at``, then name); names in ``protect`` always stay. Directories without a manifest
    (a run in progress, or one that crashed before finishing) are left alone. Returns the names
    removed."""
    from dollyflow.core.storage import remove_dir

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    complete = []
    for name in shard_versions(root):
        try:
            created = read_manifest(join(root, name)).get("created_at", "")
        except (FileNotFoundError, OSError, ValueError):
            continue
        complete.append((created, name))
    complete.sort(reverse=True)
    removed = []
    for _, name in complete[keep:]:
        if name in protect:
            continue
        remove_dir(join(root, name), under=root)
        removed.append(name)
    return sorted(removed)
