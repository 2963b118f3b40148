"""The per-machine model cache: a private directory of this user (:func:`private_dir`,
:func:`model_cache_root`) holding one entry per resolved :class:`ModelSource` identity, fetched
once per machine under a file lock and completed by a marker (:func:`cached_download`), and the
check that lets a worker reuse the driver's complete entry (:func:`fetched_copy`)."""
from __future__ import annotations

import os
import stat
import tempfile

from dollyflow.core.models.sources import ModelSource
from dollyflow.core.storage import file_lock, remove_dir

CACHE_ENV = "DOLLYFLOW_MODEL_CACHE"
COMPLETE_MARKER = ".dollyflow-complete"      # written last into a cache entry: the download is whole


def private_dir(path: str, what: str) -> str:
    """``path`` as a directory only this user can write: created with mode 0700 when missing
    (its parents as usual); an existing one must be a real directory (not a symbolic link),
    owned by this user and writable by nobody else, else a PermissionError saying what to do.
    A cache in a shared place (``/tmp``) must not be one another user prepared: its models would
    be loaded, and its pickles and configs trusted, by this user's jobs."""
    path = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise PermissionError(f"{what} {path} is a symbolic link: refusing to use it (point it at the directory "
                              f"itself, or set ${CACHE_ENV} to a directory of yours)")
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{what} {path} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
                              f"refusing to load models from it. Remove it, or set ${CACHE_ENV} to a directory "
                              "of yours")
    if st.st_mode & 0o022:
        raise PermissionError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                              f"refusing to load models from it. chmod 700 it, or set ${CACHE_ENV} to a "
                              "private directory")
    return path


def model_cache_root() -> str:
    """Where downloaded models are kept, checked by :func:`private_dir`: ``$DOLLYFLOW_MODEL_CACHE``
    when set, else ``<tmp>/dollyflow-models-<uid>`` (local disk on cluster nodes, shared by the
    Python workers of one user on one machine, created 0700)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return private_dir(env, f"${CACHE_ENV}")
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return private_dir(os.path.join(tempfile.gettempdir(), f"dollyflow-models-{uid}"), "the model cache")




def cached_download(ms: ModelSource, fetch) -> str:
    """Run ``fetch(target_dir)`` once per machine for ``ms.key`` (file lock + completion marker,
    so concurrent Python workers of one node download it once) and return the directory."""
    root = model_cache_root()
    target = os.path.join(root, ms.key)
    done = os.path.join(target, COMPLETE_MARKER)
    if os.path.exists(done):
        return target
    with file_lock(os.path.join(root, f"{ms.key}.lock")):
        if not os.path.exists(done):
            remove_dir(target, under=root)      # a half-finished download of this key
            os.makedirs(target)
            fetch(target)
            with open(done, "w") as f:
                f.write(f"{ms.kind} {ms.identity}\n")
    return target


def cache_entry(ms: ModelSource) -> str:
    """The cache directory ``ms`` is (or would be) fetched into on this machine; "" for a dir."""
    return "" if ms.kind == "dir" else os.path.join(model_cache_root(), ms.key)


def fetched_copy(ms: ModelSource, entry: str, model_dir: str) -> str | None:
    """``model_dir`` when it lies in ``entry``, a cache entry another process (the driver)
    fetched ``ms`` into, that is complete and in a private cache of this user (checked as
    :func:`model_cache_root` checks its own), else None: a worker on the driver's machine then
    uses the driver's copy instead of fetching again."""
    if ms.kind == "dir" or not entry or os.path.basename(entry) != ms.key:
        return None
    if not os.path.isfile(os.path.join(entry, COMPLETE_MARKER)):
        return None
    if not os.path.abspath(model_dir).startswith(os.path.abspath(entry) + os.sep) and \
            os.path.abspath(model_dir) != os.path.abspath(entry):
        return None
    private_dir(os.path.dirname(entry), "the driver's model cache")
    return model_dir
