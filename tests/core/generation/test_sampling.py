"""Sampling: Gumbel-max draws from the filtered distribution; row seeds."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dollyflow.core.generation.params import GenerationParams  # noqa: E402
from dollyflow.core.generation.sampling import next_tokens, row_generators, row_seed  # noqa: E402


def test_sampling_follows_the_filtered_distribution():
    """Gumbel-max sampling draws from softmax(logits / T) restricted by top_k / top_p."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 6000

    def freq(**kw):
        toks = next_tokens(logits.repeat(n, 1), GenerationParams(do_sample=True, **kw), row_generators(range(n), "cpu"))
        return np.bincount(toks.numpy(), minlength=5) / n

    def close(got, want):
        return np.abs(got - np.asarray(want)).max() < 0.025

    p = torch.softmax(logits, -1).numpy()
    assert close(freq(top_p=1.0), p)
    assert close(freq(top_p=1.0, temperature=0.5), torch.softmax(logits / 0.5, -1).numpy())
    assert close(freq(top_p=1.0, top_k=2), np.r_[p[:2] / p[:2].sum(), 0, 0, 0])
    # top_p keeps the best tokens until their mass reaches top_p: p = [.53, .20, .12, .07, .03]
    keep = np.cumsum(p) - p < 0.6
    assert keep.tolist() == [True, True, False, False, False]
    assert close(freq(top_p=0.6), np.where(keep, p, 0) / p[keep].sum())
    assert row_seed(42, "a", "b") == row_seed(42, "a", "b") != row_seed(43, "a", "b")
    assert 0 <= row_seed(1, "x", None) < 2**63
