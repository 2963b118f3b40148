"""The decode loop's KV cache: transformers' ``DynamicCache`` with preallocated layers
(:class:`PreallocatedKV`: keys and values in a buffer sized for the prompt plus the new tokens,
written in place), and the helpers that shrink and merge it as rows leave and join the running
batch (:func:`drop_left_padding`, :func:`merge_caches`).

transformers is imported when the first cache is made, not with this module: the layer class is
:class:`PreallocatedKV` mixed into transformers' ``DynamicLayer`` by
:func:`preallocated_layer_class`.
"""
from __future__ import annotations

import functools
from typing import Sequence


class PreallocatedKV:
    """The preallocated keys and values of one attention layer (mixed into transformers'
    ``DynamicLayer`` by :func:`preallocated_layer_class`): a buffer sized for the prompt plus
    ``reserve`` new tokens, so each decoding step writes its token in place instead of
    concatenating (copying) the whole cache, as ``DynamicLayer`` does."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = int(reserve)
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        add = key_states.shape[-2]
        if not self.is_initialized:
            self.is_initialized = True
            self.device = key_states.device
            b, h, n, d = key_states.shape
            self._k = key_states.new_empty((b, h, n + self.reserve, d))
            self._v = value_states.new_empty((b, h, n + self.reserve, d))
        if self.length + add > self._k.shape[-2]:   # past the reserve: grow (not expected)
            grow = max(add, self._k.shape[-2])
            self._k = _grown(self._k, grow)
            self._v = _grown(self._v, grow)
        self._k[:, :, self.length:self.length + add] = key_states
        self._v[:, :, self.length:self.length + add] = value_states
        self.length += add
        self.keys = self._k[:, :, :self.length]
        self.values = self._v[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices) -> None:
        """Keep the rows ``indices``. Increasing indices (dropping finished rows) move the
        kept rows' used columns up in place, no new buffer; any other order copies."""
        if not self.is_initialized:
            return
        rows = [int(i) for i in indices]
        if any(b <= a for a, b in zip(rows, rows[1:])):
            self._k, self._v = self._k[indices], self._v[indices]
        else:
            used = slice(0, self.length)
            for src, dst, n in _runs(rows):
                step = n if src - dst >= n else max(1, src - dst)   # never copy onto rows not yet read
                for i in range(0, n if src != dst else 0, step):
                    m = min(step, n - i)
                    self._k[dst + i:dst + i + m, :, used] = self._k[src + i:src + i + m, :, used]
                    self._v[dst + i:dst + i + m, :, used] = self._v[src + i:src + i + m, :, used]
            self._k, self._v = self._k[:len(rows)], self._v[:len(rows)]
        self.keys = self._k[:, :, :self.length]
        self.values = self._v[:, :, :self.length]

    def merge(self, other, width: int, reserve: int, keep=None, first: int = 0) -> None:
        """Rows of ``other`` appended below our rows ``keep`` (None: all) without our first
        ``first`` columns; both right-aligned on ``width`` columns (left padding zero-filled
        and masked), room for ``reserve`` more tokens."""
        keep = list(range(self._k.shape[0])) if keep is None else list(keep)
        b1, b2, length = len(keep), other._k.shape[0], self.length - first
        _, h, _, d = self._k.shape
        k = self._k.new_empty((b1 + b2, h, width + reserve, d))
        v = self._v.new_empty((b1 + b2, h, width + reserve, d))
        for buf in (k, v):   # left padding must be finite (masked scores are added, not skipped)
            buf[:b1, :, :width - length].zero_()
            buf[b1:, :, :width - other.length].zero_()
        for src, dst, n in _runs(keep):
            k[dst:dst + n, :, width - length:width] = self._k[src:src + n, :, first:self.length]
            v[dst:dst + n, :, width - length:width] = self._v[src:src + n, :, first:self.length]
        k[b1:, :, width - other.length:width] = other.keys
        v[b1:, :, width - other.length:width] = other.values
        self._k, self._v, self.length = k, v, width
        self.keys = self._k[:, :, :width]
        self.values = self._v[:, :, :width]

    def drop_left(self, n: int) -> None:
        self._k, self._v = self._k[:, :, n:], self._v[:, :, n:]
        self.length -= n
        self.keys = self._k[:, :, :self.length]
        self.values = self._v[:, :, :self.length]

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        super().reset()


@functools.cache
def preallocated_layer_class() -> type:
    """``PreallocatedLayer``: :class:`PreallocatedKV` over transformers' ``DynamicLayer`` (made
    once per process, on first use)."""
    from transformers.cache_utils import DynamicLayer

    return type("PreallocatedLayer", (PreallocatedKV, DynamicLayer),
                {"__module__": __name__, "__qualname__": "PreallocatedLayer", "__doc__": PreallocatedKV.__doc__})


def new_cache(model, reserve: int):
    """A ``DynamicCache`` for ``model``; when all its layers are plain ``DynamicLayer`` (GPT-NeoX
    and most decoder-only models), with :func:`preallocated_layer_class` layers instead."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer).__name__ == "DynamicLayer" for layer in layers):
        cls = preallocated_layer_class()
        cache.layers = [cls(reserve) for _ in layers]
    return cache


def drop_left_padding(cache, mask):
    """Drop the leading columns that are padding for every remaining row, from the mask and from
    the KV cache (when it is :func:`new_cache`'s preallocated kind)."""
    real = mask.any(dim=0).nonzero()
    first = int(real[0]) if len(real) else 0
    layers = getattr(cache, "layers", None)
    if first == 0 or not layers or not all(hasattr(layer, "drop_left") for layer in layers):
        return mask
    for layer in layers:
        layer.drop_left(first)
    return mask[:, first:]


def can_merge(cache) -> bool:
    """Whether :func:`merge_caches` can append rows to ``cache`` (all its layers preallocated)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(hasattr(layer, "merge") for layer in layers)


def merge_caches(cache, mask, other, other_mask, reserve: int, keep: Sequence[int] | None = None):
    """Append the rows of ``other`` (a freshly prefilled cache) to the rows ``keep`` of ``cache``
    (None: all; ``mask`` has those rows only), both right-aligned on max(width) columns (the
    narrower side is left-padded with masked zeros, columns that are padding in every kept row
    are dropped); returns the merged attention mask. One copy of the kept cache."""
    import torch

    real = mask.any(dim=0).nonzero()
    first = int(real[0]) if len(real) else 0
    mask = mask[:, first:]
    width = max(mask.shape[1], other_mask.shape[1])
    for layer, extra in zip(cache.layers, other.layers):
        layer.merge(extra, width, reserve, keep, first)

    def pad(m):
        return torch.cat([m.new_zeros((m.shape[0], width - m.shape[1])), m], dim=1)
    return torch.cat([pad(mask), pad(other_mask)], dim=0)


def _runs(rows: Sequence[int]):
    """(first source row, first destination row, count) of each run of consecutive ``rows``."""
    runs: list[list[int]] = []
    for dst, src in enumerate(rows):
        if runs and runs[-1][0] + runs[-1][2] == src:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [tuple(r) for r in runs]


def _grown(buf, extra: int):
    """``buf`` with ``extra`` more (uninitialised) columns on the sequence axis."""
    import torch
    return torch.cat([buf, buf.new_empty((*buf.shape[:2], extra, buf.shape[-1]))], dim=-2)
