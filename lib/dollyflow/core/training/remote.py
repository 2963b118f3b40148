"""A train output directory on an object store (``train.output_dir`` = ``s3a://...``, or the
default under a URI warehouse), engine-free.

DeepSpeed and Hugging Face write files, so the ranks train into a local *staging* directory
(:func:`staging_dir`: ``train.staging_dir``, else ``~/.cache/dollyflow/train-staging``, one
sub-directory per URI) with every local-directory rule of :mod:`.prepare` (fingerprint, resume from
the staging checkpoints, overwrite). Rank 0's driver then *publishes* it (:func:`publish`): the
old upload manifest is removed first, every file (the model, its card and provenance, metrics,
checkpoints) is uploaded, and the manifest :data:`UPLOAD_MANIFEST` (files, sizes, fingerprint) is
written **last**; files of a replaced model that the new one does not have are removed after it.
A reader that finds the manifest finds a complete model (:func:`published`); while a publish runs
it finds none, never a mixture (a reader that ignores the manifest may see a mixture during a
replacement).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dollyflow.config import redact_uri
from dollyflow.core.storage import exists, filesystem, is_uri, join, read_bytes, write_atomic, write_bytes
from dollyflow.core.training import model_dir

UPLOAD_MANIFEST = "_dollyflow_upload.json"


def staging_root(configured: str = "") -> str:
    return os.path.abspath(os.path.expanduser(configured)) if configured else \
        str(Path.home() / ".cache" / "dollyflow" / "train-staging")


def staging_dir(uri: str, configured: str = "") -> str:
    """The local directory the ranks write a model for ``uri`` into: ``<root>/<name>-<sha16>``
    (the URI's last segment and a hash of the URI without credentials)."""
    if is_uri(configured):
        raise ValueError(f"train.staging_dir: {configured!r} is a URI; it must be a local directory (the ranks "
                         "write files there before the model is uploaded)")
    clean = redact_uri(uri).split("?", 1)[0].rstrip("/")
    name = clean.rsplit("/", 1)[-1] or "model"
    return os.path.join(staging_root(configured), f"{name}-{hashlib.sha256(clean.encode()).hexdigest()[:16]}")


def published(uri: str) -> dict | None:
    """The upload manifest of a complete model at ``uri`` (None: none, or a publish is running)."""
    path = join(uri, UPLOAD_MANIFEST)
    if not exists(path):
        return None
    return json.loads(read_bytes(path))


def prepare_staging(uri: str, staging: str, fingerprint: str) -> None:
    """A staging directory holding a finished model of another fingerprint is a stale copy (the
    URI is the truth): removed, so the run trains afresh there. Checkpoints of this fingerprint
    (an interrupted run on this machine) stay, and the run resumes from them."""
    prov = model_dir.read_provenance(staging)
    if prov is not None and prov.get("fingerprint", {}).get("sha256") != fingerprint:
        shutil.rmtree(staging)


def publish(staging: str, uri: str, fingerprint: str) -> dict:
    """Upload the finished model in ``staging`` to ``uri``, the manifest last (see the module);
    returns the manifest."""
    old = published(uri)
    if exists(join(uri, UPLOAD_MANIFEST)):
        write_bytes(join(uri, UPLOAD_MANIFEST + ".replacing"), b"{}")
        _delete(join(uri, UPLOAD_MANIFEST))
    files = {}
    for p in sorted(Path(staging).rglob("*")):
        if p.is_file() and not p.name.endswith(".lease.json"):
            rel = p.relative_to(staging).as_posix()
            data = p.read_bytes()
            write_bytes(join(uri, rel), data)
            files[rel] = len(data)
    manifest = {"fingerprint": fingerprint, "files": files, "format": 1}
    write_atomic(join(uri, UPLOAD_MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    for rel in sorted(set((old or {}).get("files", {})) - set(files)):
        _delete(join(uri, rel))
    if exists(join(uri, UPLOAD_MANIFEST + ".replacing")):
        _delete(join(uri, UPLOAD_MANIFEST + ".replacing"))
    return manifest


def check_published(uri: str, fingerprint: str) -> dict:
    """After :func:`publish`: the manifest is there, of this fingerprint, and every file it lists
    has its size at ``uri`` (the driver verifies the directory it reports)."""
    m = published(uri)
    if m is None or m.get("fingerprint") != fingerprint:
        raise RuntimeError(f"{redact_uri(uri)}: the uploaded model's manifest is missing or of another run")
    fs, root = filesystem(uri)
    bad = [rel for rel, size in m["files"].items() if fs.get_file_info(f"{root}/{rel}").size != size]
    if bad:
        raise RuntimeError(f"{redact_uri(uri)}: uploaded files missing or of the wrong size: {bad[:5]}")
    return m


def _delete(path: str) -> None:
    fs, p = filesystem(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass
