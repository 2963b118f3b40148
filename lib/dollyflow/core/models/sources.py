"""Model sources: which kind a configured source is (:func:`source_kind`), and its resolution to
an immutable identity (:func:`locate_model` -> :class:`ModelSource`), without downloading.

A model source is one of four kinds (source_kind):
  - dir: a local directory (or a FUSE path such as /dbfs/... or /Volumes/...): a Hugging Face
    model directory as the train job writes it (config.json, *.safetensors, tokenizer files
    with Dolly's special tokens, generation_config.json). Used where it is.
  - uri: a pyarrow filesystem URI (s3://, gs://, abfss://, hdfs://, file://) of such a
    directory, copied once per machine into the model cache.
  - mlflow: an MLflow URI (runs:/<run id>/<path>, models:/<name>/<version | alias | stage |
    latest>, models:/<name>@<alias>, models:/<logged model id>, mlflow-artifacts:/...,
    dbfs:/databricks/mlflow...): its artifacts downloaded once per machine into the cache; a
    transformers-flavor layout (model/ and components/tokenizer/) is recognised.
  - hub: a Hugging Face hub name, on clusters that can reach the hub: org/name or
    org/name@<revision>; a snapshot of its safetensors, config and tokenizer files.

Which text is a hub name and which a path (so that a mistyped or missing local directory is an
error, not a download of whatever the hub has under that name): anything that exists locally
is a path; a hub name is exactly ``org/name`` or ``org/name@revision`` (letters, digits, ``_``,
``.``, ``-``; one ``/``) that does not start with ``.``, ``/`` or ``~`` and whose first segment
is not an existing local file or directory (``out/dolly-lora`` with an ``out/`` here is a
missing path). Everything else that does not exist is a missing path and fails, naming it.

The cache is keyed by an immutable identity of what was resolved, never by the source text,
so a moving source (an alias, ``latest``, a stage, a rewritten directory, a hub branch) is
fetched again when it moves: an MLflow registry source is resolved to its model version (name
and number, with its run id and source) and that version is downloaded; ``runs:/`` and other
run artifact URIs are keyed by the run; a ``uri`` directory by a fingerprint of its listing
(each file's path, size and modification time; pyarrow exposes no ETag or object version);
a hub name by the commit sha the revision points at (``HfApi().model_info``), which is then
what is downloaded. The cache is a private directory (see
:func:`dollyflow.core.models.cache.model_cache_root`); fetching is
:mod:`dollyflow.core.models.fetch`.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from dollyflow.config import redact_uri
from dollyflow.core.storage import filesystem
from dollyflow.core.training.remote import UPLOAD_MANIFEST

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "dbfs:/databricks/mlflow")
_HUB_NAME = re.compile(r"(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9_][\w.-]*)(?:@(?P<revision>[\w.-]+))?")


def _hub_name(s: str):
    """The match of a hub name (see above), or None when ``s`` is to be read as a path."""
    m = _HUB_NAME.fullmatch(s)
    if m is None or s.startswith((".", "/", "~")) or os.path.lexists(os.path.expanduser(m["org"])):
        return None
    return m


def source_kind(source: str) -> str:
    """``dir``, ``mlflow``, ``uri`` or ``hub`` for a model source (see above). A path that does
    not exist (and is no hub name) is a FileNotFoundError naming it."""
    s = str(source)
    if not s:
        raise ValueError("empty model source")
    if s.startswith(MLFLOW_SCHEMES):
        return "mlflow"
    if "://" in s:
        return "uri"
    path = os.path.expanduser(s)
    if os.path.isdir(path):
        return "dir"
    if os.path.lexists(path):
        raise NotADirectoryError(f"model source {os.path.abspath(path)} is not a directory (a model is a directory "
                                 "with config.json and *.safetensors)")
    if _hub_name(s):
        return "hub"
    raise FileNotFoundError(f"model directory {os.path.abspath(path)} does not exist (model source {s!r}); a "
                            "Hugging Face hub name is org/name or org/name@revision whose first segment is not "
                            "a local path")


@dataclass(frozen=True)
class ModelSource:
    """A model source resolved to an immutable identity (small and picklable: it travels to the
    Spark workers, which fetch exactly ``pinned`` and check it is still ``identity``).

    ``source`` is as configured and may hold credentials (``s3://KEY:SECRET@...``): print
    :attr:`display`, never ``source``."""
    kind: str                  # dir | uri | mlflow | hub
    source: str                # as configured
    pinned: str                # what is fetched: the directory, the URI, models:/<name>/<version>, org/name@<sha>
    identity: str              # the immutable identity (credential-free): listing sha256, model version, commit sha
    key: str = ""              # the cache key (sha256 hex of kind and identity); "" for a dir

    @property
    def display(self) -> str:
        return redact_uri(self.source)

    def describe(self) -> dict:
        """What the job summary says about the source (no credentials)."""
        return {"kind": self.kind, "source": self.display, "resolved": redact_uri(self.pinned),
                "identity": self.identity}


def _cache_key(kind: str, identity: str) -> str:
    return hashlib.sha256(f"{kind}\n{identity}".encode("utf-8")).hexdigest()[:32]


def listing(source: str) -> tuple[object, str, list[tuple[str, int, int]]]:
    """(filesystem, root, [(relative path, size, mtime ns)]) of every file under a URI directory."""
    fs, root = filesystem(source)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        raise FileNotFoundError(f"model directory {redact_uri(source)} does not exist") from None
    files = sorted((i.path[len(root):].lstrip("/"), int(i.size), int(i.mtime_ns or 0))
                   for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"model directory {redact_uri(source)} holds no files")
    names = {p for p, _, _ in files}
    if UPLOAD_MANIFEST + ".replacing" in names:
        raise RuntimeError(f"model directory {redact_uri(source)} is being replaced by a train job's upload: run "
                           "again once it has finished")
    if UPLOAD_MANIFEST in names:    # a train job's upload: the model, not its checkpoints
        files = [f for f in files if not f[0].startswith("checkpoints/") and f[0] != UPLOAD_MANIFEST]
    return fs, root, files


def listing_identity(files: list[tuple[str, int, int]]) -> str:
    text = "".join(f"{p}\t{size}\t{mtime}\n" for p, size, mtime in files)
    return f"listing-sha256:{hashlib.sha256(text.encode('utf-8')).hexdigest()}"


def _mlflow_source(source: str) -> ModelSource:
    """An MLflow source pinned: a registry URI (alias, stage, ``latest``) to its model version."""
    if not source.startswith("models:/"):
        # runs:/<run id>/..., mlflow-artifacts:/..., dbfs:/databricks/mlflow...: a run's artifacts
        import mlflow

        identity = f"{redact_uri(mlflow.get_tracking_uri())} {redact_uri(source)}"
        return ModelSource("mlflow", source, source, identity, _cache_key("mlflow", identity))
    import mlflow
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    resolved = get_model_name_and_version(client, source)   # MLflow's own resolution of alias/stage/latest
    registry = redact_uri(mlflow.get_registry_uri())
    if len(resolved) == 1:                                   # models:/<logged model id>: immutable
        identity = f"{registry} models:/{resolved[0]}"
        return ModelSource("mlflow", source, source, identity, _cache_key("mlflow", identity))
    name, version = resolved
    mv = client.get_model_version(name, str(version))
    pinned = f"models:/{name}/{mv.version}"
    identity = f"{registry} {pinned} run {mv.run_id} source {redact_uri(str(mv.source))}"
    return ModelSource("mlflow", source, pinned, identity, _cache_key("mlflow", identity))


def _hub_source(source: str) -> ModelSource:
    m = _hub_name(source)
    name, revision = f"{m['org']}/{m['name']}", m["revision"]
    try:
        from huggingface_hub import HfApi
        sha = HfApi().model_info(name, revision=revision).sha
    except Exception as e:
        raise RuntimeError(f"model source {source!r} was read as a Hugging Face hub name, and the hub could not "
                           f"resolve it ({type(e).__name__}: {e}). If you meant a local directory: "
                           f"{os.path.abspath(os.path.expanduser(source))} does not exist") from None
    if not sha:
        raise RuntimeError(f"the hub gave no commit sha for {source!r}")
    pinned = f"{name}@{sha}"
    return ModelSource("hub", source, pinned, pinned, _cache_key("hub", pinned))


def locate_model(source: str) -> ModelSource:
    """Resolve ``source`` (see above) to a :class:`ModelSource` with its immutable identity;
    downloads nothing (lists a ``uri`` directory, asks the MLflow registry or the hub)."""
    kind = source_kind(source)
    if kind == "dir":
        d = os.path.abspath(os.path.expanduser(source))
        return ModelSource("dir", d, d, d)       # stored and shown as the absolute path
    if kind == "uri":
        _, _, files = listing(source)
        identity = f"{redact_uri(source)} {listing_identity(files)}"
        return ModelSource("uri", source, source, identity, _cache_key("uri", identity))
    if kind == "mlflow":
        return _mlflow_source(source)
    return _hub_source(source)
