"""The per-process cache of loaded models (one load per Python worker): :func:`cached` keeps
loaded models across Spark batches and tasks of one Python worker; :func:`loads` counts the
loads."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from dollyflow.core.models.device import release_gpu_memory

_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_CACHE_SIZE = 2
_LOADS = [0]
_LOCK = threading.Lock()


def cached(key: tuple, load: Callable[[], object]) -> tuple[object, bool]:
    """(the object cached under ``key``, whether it was loaded now): a loaded model and its
    tokenizer, typically, keyed by weights digest, device and dtype. At most two stay loaded per
    process; the least recently used one is dropped (and the GPU's cached memory released)."""
    with _LOCK:
        value = _CACHE.get(key)
        if value is not None:
            _CACHE.move_to_end(key)
            return value, False
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.popitem(last=False)
            release_gpu_memory()
        value = load()
        _CACHE[key] = value
        _LOADS[0] += 1
        return value, True


def loads() -> int:
    """How many models this process has loaded through :func:`cached`."""
    return _LOADS[0]
