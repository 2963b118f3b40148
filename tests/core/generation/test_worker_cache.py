"""The per-process model cache."""
from __future__ import annotations

from dollyflow.core.generation.worker_cache import cached, loads


def test_the_model_cache_loads_once_per_key():
    before = loads()
    built = []

    def load():
        built.append(1)
        return ("model", "tokenizer")
    key = ("test-digest", "cpu", "float32", object())
    assert cached(key, load) == (("model", "tokenizer"), True)
    assert cached(key, load) == (("model", "tokenizer"), False)
    assert len(built) == 1 and loads() == before + 1
