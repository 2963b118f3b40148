"""The decode loop's preallocated KV cache: rows leaving in place, left padding dropped, merges."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dollyflow.core.generation.kv_cache import drop_left_padding, new_cache, preallocated_layer_class  # noqa: E402


def test_preallocated_cache_with_rows_leaving_and_padding_dropped(loaded):
    """The loop's KV cache: a long row leaves the batch, the short row's left padding is dropped,
    and its next logits equal those of the short row run alone."""
    model, _ = loaded
    long_ids, short_ids = list(range(100, 130)), list(range(200, 210))
    ids = torch.tensor([long_ids, [0] * 20 + short_ids])
    mask = torch.tensor([[1] * 30, [0] * 20 + [1] * 10])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        cache = new_cache(model, reserve=4)
        assert type(cache.layers[0]).__name__ == "PreallocatedLayer"
        model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor([1]))
        mask = drop_left_padding(cache, mask[[1]])
        assert mask.shape == (1, 10) and cache.get_seq_length() == 10
        mask = torch.cat([mask, mask.new_ones((1, 1))], -1)
        step = model(input_ids=torch.tensor([[7]]), attention_mask=mask, position_ids=torch.tensor([[10]]),
                     cache=cache, use_cache=True).logits[0, -1]
        alone = model(input_ids=torch.tensor([short_ids + [7]])).logits[0, -1]
    assert torch.allclose(step, alone, atol=1e-4)


def test_preallocated_cache_keeps_rows_in_place_and_merges_kept_rows():
    """Dropping finished rows moves the kept ones up inside the buffer (any subset, overlapping
    moves included); a merge takes the kept rows and drops the columns padding in all of them."""
    import random

    layer_class = preallocated_layer_class()
    rng = random.Random(0)
    for _ in range(200):
        b, n = rng.randint(1, 12), rng.randint(1, 6)
        layer = layer_class(3)
        k, v = torch.randn(b, 2, n, 4), torch.randn(b, 2, n, 4)
        layer.update(k, v)
        buffer = layer._k.data_ptr()
        keep = sorted(rng.sample(range(b), rng.randint(1, b)))
        layer.batch_select_indices(torch.tensor(keep))
        assert torch.equal(layer.keys, k[keep]) and torch.equal(layer.values, v[keep])
        assert layer._k.data_ptr() == buffer                       # in place
        step = torch.randn(len(keep), 2, 1, 4)
        layer.update(step, step)
        assert torch.equal(layer.keys[:, :, -1:], step)
    # merge: rows 0 and 2 of a 3-row cache whose first column is padding for both
    a, other = layer_class(2), layer_class(2)
    a.update(torch.arange(3 * 4.0).view(3, 1, 4, 1), torch.zeros(3, 1, 4, 1))
    other.update(torch.full((1, 1, 2, 1), -1.0), torch.zeros(1, 1, 2, 1))
    a.merge(other, width=3, reserve=2, keep=[0, 2], first=1)
    assert a.keys[:, 0, :, 0].tolist() == [[1, 2, 3], [9, 10, 11], [0, -1, -1]]
    assert a._k.shape[2] == 5
