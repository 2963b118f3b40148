"""Paths and URIs: one way to reach local files and object stores (engine-free).

Every job that writes files outside Delta (shards, checkpoints, model directories, reports) goes
through these helpers, so a local path, a FUSE mount (``/dbfs``, ``/Volumes``) and a pyarrow
filesystem URI (``s3://``, ``gs://``, ``abfss://``, ``file://``) behave the same.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (an object store or ``file://``), False for a plain path."""
    return "://" in str(path)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI (s3://, gs://, abfss://, file://)."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(path: str) -> str:
    """A URI unchanged, a local path made absolute."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for paths and URIs alike (no OS separator surprises on URIs)."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


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


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def remove_dir(path: str) -> None:
    """Remove a directory and everything below it; a missing one is fine."""
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
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


def save_with(target: str, save) -> None:
    """Call ``save(local_directory)`` and make its files appear under ``target``: directly when
    ``target`` is a local path, through a temporary directory and :func:`upload_dir` for a URI."""
    if not is_uri(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        save(target)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        upload_dir(tmp, target)
