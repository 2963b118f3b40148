"""Generation parameters: the identity (greedy ignores the sampling knobs) and validation."""
from __future__ import annotations

import json

import pytest

from dollyflow.core.generation.params import GenerationParams


def test_params_identity_and_validation():
    a = GenerationParams()
    assert a.to_dict() == {"max_new_tokens": 256, "do_sample": False}   # greedy ignores sampling knobs
    assert GenerationParams(top_p=0.5).digest() == a.digest()
    s = GenerationParams(do_sample=True)
    assert json.loads(s.to_json()) == {"max_new_tokens": 256, "do_sample": True, "temperature": 1.0,
                                       "top_p": 0.92, "top_k": 0, "seed": 42}
    assert s.digest() != a.digest() != GenerationParams(max_new_tokens=10).digest()
    for bad in (dict(max_new_tokens=0), dict(do_sample=True, temperature=0), dict(do_sample=True, top_p=0),
                dict(do_sample=True, top_k=-1)):
        with pytest.raises(ValueError):
            GenerationParams(**bad)
