"""Paths and URIs: one way to reach local files and object stores (engine-free).

Every job that writes files outside Delta (shards, checkpoints, model directories, reports) goes
through these helpers, so a local path, a FUSE mount (``/dbfs``, ``/Volumes``) and a pyarrow
filesystem URI (``s3://``, ``gs://``, ``abfss://``, ``hdfs://``, ``file://``) behave the same.

Spark-style spellings are accepted too: ``s3a://`` and ``s3n://`` are read as ``s3://`` (same
bucket and key). An S3 URI reaches the endpoint and credentials of the ``storage:`` config section
when one is set (:mod:`~dollyflow.core.object_store`), else pyarrow's defaults (the AWS default
credential chain, e.g. the cluster's instance profile); a URI that carries its own
(``s3://KEY:SECRET@bucket/p?endpoint_override=...``) keeps them.
``dbfs:/path`` is read through Databricks' FUSE mount ``/dbfs/path`` (so it works
on Databricks only, and says so elsewhere).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from dollyflow.core import object_store


#: Mount points that every node of a Databricks cluster sees (Unity Catalog Volumes, DBFS,
#: workspace files): a path under one of them is shared storage although it looks local.
SHARED_MOUNTS = ("/Volumes/", "/dbfs/", "/Workspace/")
DBFS_FUSE = "/dbfs"


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (an object store or ``file://``) and ``dbfs:/...``."""
    path = str(path)
    return "://" in path or path.startswith("dbfs:")


def native(path: str) -> str:
    """The spelling pyarrow understands: ``s3a://``/``s3n://`` -> ``s3://``, ``dbfs:/x`` ->
    ``/dbfs/x`` (Databricks' FUSE mount; an error where there is none)."""
    path = str(path)
    for scheme in ("s3a://", "s3n://"):
        if path.startswith(scheme):
            return "s3://" + path[len(scheme):]
    if path.startswith("dbfs:"):
        if not os.path.isdir(DBFS_FUSE):
            raise ValueError(f"{path}: dbfs:/ paths are reachable only on Databricks (through "
                             f"{DBFS_FUSE}); use a /Volumes/... path or an object-store URI")
        return DBFS_FUSE + "/" + path[len("dbfs:"):].lstrip("/")
    return path


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI (s3://, s3a://, gs://, abfss://,
    hdfs://, file://, dbfs:/)."""
    uri = native(uri)
    settings = object_store.active()
    if settings is not None and uri.startswith("s3://") and "?" not in uri and "@" not in uri.split("/")[2]:
        # the configured endpoint and credentials (storage:); a URI carrying its own wins
        return _s3(json.dumps(settings, sort_keys=True)), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


@functools.lru_cache(maxsize=4)
def _s3(settings: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**object_store.pyarrow_options(json.loads(settings)))


def absolute(path: str) -> str:
    """A URI unchanged, a local path made absolute."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def is_shared(path: str, shared_mounts=()) -> bool:
    """Whether every node of a cluster can see ``path``: a URI (object store, HDFS, dbfs:/), a
    path under a Databricks mount (/Volumes, /dbfs, /Workspace) or under one of ``shared_mounts``
    (``tables.shared_mounts``: local paths mounted on every node, e.g. NFS). Any other plain local
    path is not."""
    path = str(path)
    if is_uri(path):
        return not path.startswith("file:")
    full = os.path.abspath(path)
    if full.startswith(SHARED_MOUNTS):
        return True
    return any(full == os.path.abspath(m) or full.startswith(os.path.abspath(m).rstrip("/") + "/")
               for m in shared_mounts)


def is_local_master(master: str) -> bool:
    """True for ``local``, ``local[N]``, ``local-cluster[...]`` is not: its executors are other
    processes, but on this machine, so they share its disk too."""
    return str(master).startswith("local")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for paths and URIs alike (no OS separator surprises on URIs); a URI's
    query string (``s3://b/p?endpoint_override=...``) stays at the end."""
    base, query = str(base), ""
    if is_uri(base) and "?" in base:
        base, query = base.split("?", 1)
        query = "?" + query
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + query


def check_reachable(path: str, master: str, allow_local: bool = False, what: str = "output",
                    shared_mounts=(), allow_key: str = "") -> None:
    """Refuse a plain local path when executors may run on other hosts (any master but
    ``local[...]``): each executor would read or write its own disk and the driver's listing would
    name files that are not there. A path under one of ``shared_mounts`` (``tables.shared_mounts``)
    is accepted, and so is any path with ``allow_local`` (the key ``allow_key``: this path is a
    shared mount). The error names ``what`` (the key) and both ways out."""
    if allow_local or is_shared(path, shared_mounts) or is_local_master(master):
        return
    alt = f", or set {allow_key}=true" if allow_key else ""
    raise ValueError(f"{what} {path!r} is a local path of the driver, but the Spark master is {master!r}: "
                     "executors on other hosts (and training ranks there) cannot see it. Use shared storage (a "
                     "/Volumes/... path on Databricks, or s3://, abfss://, gs://, hdfs:// URIs), or, if it lies "
                     "on a mount every node has (NFS), declare that mount: tables.shared_mounts=[<mount "
                     f"point>]{alt}")


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a local path or a filesystem URI (creating parent directories)."""
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


#: Filesystems where a file can be renamed: a write goes to a temporary file beside the target
#: and is renamed over it. Object stores (S3, GCS, Azure Blob) have no rename, but a PUT there
#: is atomic already: readers see the old object or the new one.
RENAMING_FILESYSTEMS = ("local", "hdfs", "viewfs")


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive advisory lock (``flock``) held while the block runs, on the local file
    ``path`` (created when absent; POSIX only). Other processes of this machine taking the same
    lock wait; it is released when the block ends, or the process dies."""
    import fcntl   # POSIX only: imported where a lock is taken
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _rename(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Rename ``src`` over ``dst`` (``os.replace`` locally; HDFS through pyarrow, which replaces
    an existing file by deleting it first, since HDFS's rename does not overwrite)."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(src, dst)
    else:
        fs.move(src, dst)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old content or the new, never a part: on a local
    path, ``file://`` and ``hdfs://`` it is written to a temporary file beside the target, flushed
    and renamed over it; on an object store one PUT is atomic already. A failed write leaves the
    previous content and no temporary file behind."""
    fs, p = filesystem(path)
    if fs.type_name not in RENAMING_FILESYSTEMS:
        write_bytes(path, data)
        return
    parent, name = p.rsplit("/", 1) if "/" in p else ("", p)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}" if parent else \
        f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
        _rename(fs, tmp, p)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def list_dir(path: str) -> list[tuple[str, bool]]:
    """(name, is_directory) of the entries directly under ``path``, sorted; [] when missing."""
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)


def _split_uri(path: str) -> tuple[str, str]:
    """(scheme://authority, normalised path) of a URI without its query; ("", absolute real
    path) for a local path (symbolic links resolved, so a link cannot lead a removal outside)."""
    path = native(str(path))
    if "://" not in path:
        return "", os.path.realpath(os.path.abspath(path))
    path = path.split("?", 1)[0]
    scheme, rest = path.split("://", 1)
    authority, _, inner = rest.partition("/")
    return f"{scheme.lower()}://{authority}", posixpath.normpath("/" + inner)


def check_within(path: str, parent: str, what: str = "path") -> str:
    """``path`` when it lies strictly below ``parent`` (after normalising ``..`` and, for local
    paths, symbolic links), else a ValueError naming both. Every directory the project removes
    or overwrites is checked against the directory it belongs to first, so no name from a
    config (a run id, a table or model name) can turn a removal into one of its parent."""
    base_p, base = _split_uri(parent)
    here_p, here = _split_uri(path)
    inside = base_p == here_p and here != base and (here.startswith(base.rstrip("/") + "/") or base == "/")
    if not inside:
        raise ValueError(f"refusing to remove or overwrite {what} {path!r}: it does not lie below {parent!r}")
    return path


def remove_dir(path: str, under: str) -> None:
    """Remove a directory and everything below it; a missing one is fine. ``under``: the
    directory it must lie below (:func:`check_within`), checked before anything is removed."""
    check_within(path, under)
    if not is_uri(path):
        shutil.rmtree(native(path), ignore_errors=True)
        return
    fs, root = filesystem(path)
    try:
        fs.delete_dir_contents(root, missing_dir_ok=True)
        fs.delete_dir(root)
    except FileNotFoundError:
        pass


def upload_dir(local_dir: str | Path, target: str) -> list[str]:
    """Copy the files of a local directory tree to ``target`` (a path or a URI); returns the
    relative names copied. Used to put locally written artefacts (a saved tokenizer or model)
    onto shared storage."""
    local_dir = Path(local_dir)
    names = []
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(local_dir).as_posix()
            write_bytes(join(target, rel), p.read_bytes())
            names.append(rel)
    return names
