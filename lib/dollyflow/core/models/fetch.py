"""Fetching a model: the local directory of a resolved :class:`ModelSource` (:func:`fetch_model`;
a ``dir`` as it is, anything else downloaded once per machine into the model cache), and
:func:`resolve_model_dir` (locate, then fetch)."""
from __future__ import annotations

import os

import pyarrow.fs as pafs

from dollyflow.core.models.cache import cached_download
from dollyflow.core.models.sources import ModelSource, listing, listing_identity, locate_model

_HUB_FILES = ["*.safetensors", "*.json", "*.txt", "*.model", "README.md"]   # never pickled .bin weights


def _fetch_uri(ms: ModelSource, target: str) -> None:
    """Copy exactly the listed files, checking the listing is still the one ``ms`` was resolved
    with, before and after (a directory rewritten meanwhile is an error, never a mixed copy)."""
    fs, root, files = listing(ms.source)
    prefix = f"{ms.display} "
    if f"{prefix}{listing_identity(files)}" != ms.identity:
        raise RuntimeError(f"model directory {ms.display} changed since it was resolved ({ms.identity}): "
                           "was it rewritten during the job? Run again")
    local = pafs.LocalFileSystem()
    for rel, _, _ in files:
        dst = os.path.join(target, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        pafs.copy_files(f"{root}/{rel}", dst, source_filesystem=fs, destination_filesystem=local)
    _, _, after = listing(ms.source)
    if after != files:
        raise RuntimeError(f"model directory {ms.display} changed while it was copied: run again")


def fetch_model(ms: ModelSource) -> str:
    """The local model directory of a :class:`ModelSource` (a ``dir`` as it is; anything else
    downloaded once per machine into the cache under its immutable identity)."""
    if ms.kind == "dir":
        if not os.path.isdir(ms.pinned):
            raise FileNotFoundError(f"model directory {ms.pinned} does not exist on this machine "
                                    "(on a cluster, use shared storage: /Volumes, /dbfs or an object-store URI)")
        return ms.pinned
    if ms.kind == "uri":
        return _find_model_dir(cached_download(ms, lambda target: _fetch_uri(ms, target)))
    if ms.kind == "mlflow":
        def fetch(target):
            import mlflow.artifacts
            mlflow.artifacts.download_artifacts(artifact_uri=ms.pinned, dst_path=target)
        return _find_model_dir(cached_download(ms, fetch))
    if ms.kind == "hub":
        def fetch(target):
            from huggingface_hub import snapshot_download
            name, sha = ms.pinned.split("@", 1)
            snapshot_download(name, revision=sha, local_dir=target, allow_patterns=_HUB_FILES)
        return _find_model_dir(cached_download(ms, fetch))
    raise ValueError(f"unknown model source kind {ms.kind!r}")


def _find_model_dir(root: str) -> str:
    """The shallowest directory under ``root`` with a config.json beside weights."""
    candidates = []
    for dirpath, _dirs, files in os.walk(root):
        if "config.json" in files and any(f.endswith((".safetensors", ".bin", ".safetensors.index.json"))
                                          for f in files):
            candidates.append(dirpath)
    if not candidates:
        raise FileNotFoundError(f"no Hugging Face model directory (config.json + weights) under {root}")
    return min(candidates, key=lambda d: (d.count(os.sep), d))


def resolve_model_dir(source: str) -> str:
    """A local directory holding the model of ``source`` (:func:`locate_model`, then
    :func:`fetch_model`: downloaded once per machine and identity when it is remote). Local
    directories are returned as they are."""
    return fetch_model(locate_model(source))
