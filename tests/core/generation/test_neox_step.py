"""The hand-written GPT-NeoX decode step against the model's forward, and its attention groups."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dollyflow.core.generation.kv_cache import new_cache  # noqa: E402
from dollyflow.core.generation.neox_step import GROUP_COST_COLUMNS, NeoXStep, attention_groups, supports  # noqa: E402


def test_neox_step_equals_the_model_forward_on_a_padded_batch(loaded):
    """The hand-written GPT-NeoX decode step on a batch of rows right-aligned at different
    columns (grouped attention), for some rows only (finished ones skipped), gives the logits
    of the model's forward."""
    model, _ = loaded
    assert supports(model)
    lengths = [40, 38, 9, 7, 25, 3]
    width = max(lengths)
    torch.manual_seed(0)
    ids = torch.randint(10, 500, (len(lengths), width))
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step = NeoXStep(model)
    with torch.inference_mode():
        caches = [new_cache(model, reserve=4) for _ in range(2)]
        for cache in caches:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        new = torch.tensor([11, 12, 13, 14, 15, 16])
        mask2 = torch.cat([mask, mask.new_ones((len(lengths), 1))], -1)
        want = model(input_ids=new[:, None], attention_mask=mask2, position_ids=pos[:, -1:] + 1, cache=caches[0],
                     use_cache=True).logits[:, -1]
        starts = (mask2 != 0).int().argmax(dim=1).tolist()
        live = [True, True, False, True, True, True]
        groups = attention_groups(starts, live, width + 1)
        assert groups == [(0, 2, 0, True), (3, 6, 15, True)]     # finished row 2 attends to nothing
        rows = torch.tensor([j for j, alive in enumerate(live) if alive])
        got = step(new, pos[:, -1] + 1, caches[1], mask2, groups, rows)
    assert got.shape == (5, want.shape[-1])
    assert torch.allclose(got, want[rows], atol=1e-4)
    assert torch.equal(got.argmax(-1), want[rows].argmax(-1))


def test_attention_groups_trade_padding_against_calls():
    # equal starts: one group, no mask; finished rows split runs and are left out
    assert attention_groups([5, 5, 5], [True] * 3, 100) == [(0, 3, 5, False)]
    assert attention_groups([5, 5, 5, 5], [True, False, True, True], 100) == [(0, 1, 5, False), (2, 4, 5, False)]
    # a short row beside long ones: its own group when the padding saved exceeds a call's cost
    far = 1000 - GROUP_COST_COLUMNS // 2
    assert attention_groups([0, 0, 0, 0, far], [True] * 5, 1000) == [(0, 4, 0, False), (4, 5, far, False)]
    assert attention_groups([0, 0, 0, 0, 200], [True] * 5, 1000) == [(0, 5, 0, True)]
    assert attention_groups([0, 0, 3], [True] * 3, 100) == [(0, 3, 0, True)]   # a little padding: masked
