"""The decode loop's state: a :class:`Prompt` admitted for generation and the
:class:`RunningBatch` (per row its prompt, tokens, start time and generator; the KV cache,
attention mask, next positions, last logits and tokens)."""
from __future__ import annotations

from dataclasses import dataclass

from dollyflow.core.generation.kv_cache import drop_left_padding


@dataclass
class Prompt:
    index: int               # position in the caller's rows
    ids: list[int]
    seed: int
    trimmed: int = 0


class RunningBatch:
    """The running batch of the decode loop: per slot (batch row) the prompt (None once finished),
    its tokens, start time and generator; the KV cache, attention mask, next positions, last
    logits and tokens. ``rows``: the slots the logits belong to, in order (None: every slot)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.cache = self.mask = self.next_pos = self.logits = self.tokens = self.rows = None
        self.slots: list = []
        self.generated: list[list[int]] = []
        self.started: list[float] = []
        self.generators: list = []

    def dead(self) -> int:
        return sum(r is None for r in self.slots)

    def compact(self, device, cache: bool = True) -> list[int] | None:
        """Drop the finished slots from every tensor and the all-padding columns on the left.
        ``cache=False``: leave the KV cache as it is and return the slots kept (None: all), for
        :func:`~dollyflow.core.generation.kv_cache.merge_caches` to select them in the copy it
        makes anyway."""
        import torch

        keep = [j for j, r in enumerate(self.slots) if r is not None]
        if len(keep) == len(self.slots):
            return None
        if not keep:
            self.clear()
            return None
        index = torch.tensor(keep, device=device)
        if cache:
            self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        if self.logits is not None and self.rows is None:
            self.logits = self.logits[index]
        self.rows = None   # logits of some rows only are those of the live (kept) rows, or stale
        if self.tokens is not None:
            self.tokens = self.tokens[index]
        self.slots = [self.slots[j] for j in keep]
        self.generated = [self.generated[j] for j in keep]
        self.started = [self.started[j] for j in keep]
        if self.generators:
            self.generators = [self.generators[j] for j in keep]
        if cache:
            self.mask = drop_left_padding(self.cache, self.mask)
        return keep
