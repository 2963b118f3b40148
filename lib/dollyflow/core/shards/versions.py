"""Versioned shard directories under a shards root and the root's ``LATEST.json`` pointer:
naming a version, moving the pointer (never back), resolving a root to the directory to read,
telling whether a re-run would build the same shards, and pruning old versions.

Each tokenize run writes a new directory under a *shards root* (``<root>/v<silver version>-<run
id>/``) and, only once it is complete and verified, switches the root's pointer file
``LATEST.json`` to it (:func:`write_pointer`, an atomic replace or a single object PUT). Nothing
is deleted or moved before that, so readers always see a complete set, on object stores as well.
:func:`resolve_shard_dir` turns a root or a directory into the directory to read.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from dollyflow.core.shards.manifest import FORMAT_VERSION, MANIFEST, read_manifest
from dollyflow.core.storage import file_lock, is_uri, join, list_dir, read_bytes, remove_dir, write_atomic

POINTER = "LATEST.json"
POINTER_FORMAT = "dollyflow-shards-pointer"


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
    os.makedirs(root, exist_ok=True)
    with file_lock(os.path.join(root, ".LATEST.lock")):
        yield


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


def prune_versions(root: str, keep: int, protect: Sequence[str] = ()) -> list[str]:
    """Remove complete shard versions under ``root`` beyond the ``keep`` newest (by manifest
    ``created_at``, then name); names in ``protect`` always stay. Directories without a manifest
    (a run in progress, or one that crashed before finishing) are left alone. Returns the names
    removed."""
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
