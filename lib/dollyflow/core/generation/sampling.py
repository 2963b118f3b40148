"""Seeds and sampling: a row's default seed (:func:`row_seed`), its ``torch.Generator``
(:func:`row_generators`) and the next token of every row (:func:`next_tokens`: the argmax, or a
Gumbel-max sample from the temperature / top_k / top_p filtered distribution)."""
from __future__ import annotations

import hashlib
from typing import Sequence

from dollyflow.core.generation.params import GenerationParams

MASK64 = (1 << 64) - 1


def row_seed(seed: int, instruction: str | None, context: str | None = None) -> int:
    """A row's default sampling seed: from the run's seed and the row's text, so the same prompt
    draws the same sample wherever it runs (a 63-bit int, fits a Spark long)."""
    text = f"{int(seed)}\x1f{instruction or ''}\x1f{context or ''}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def row_generators(seeds: Sequence[int], device) -> list:
    """One ``torch.Generator`` per row, seeded with the row's seed."""
    import torch
    return [torch.Generator(device=device).manual_seed(int(s) & MASK64) for s in seeds]


def next_tokens(logits, params: GenerationParams, generators: Sequence | None = None):
    """The next token of every row: the argmax, or a sample from the temperature / top_k / top_p
    filtered distribution (applied in that order, as transformers does).

    Sampling is the Gumbel-max trick: ``argmax(logits / T + Gumbel noise)`` over the kept tokens,
    with one uniform draw *per vocabulary entry* from the row's own generator at every step. A
    row's noise therefore depends only on its seed and the step, and the picked token changes
    only if two noisy scores are within rounding of each other (probability ~1e-6 per step) --
    unlike inverse-CDF sampling, where the float noise of a different batch shape moves the
    cumulative sum across a bucket edge every few dozen steps on a flat distribution.

    Raises FloatingPointError when a row's logits hold NaN or +inf (fp16 overflow, corrupt
    weights): the argmax picks such an entry, so checking the picked scores finds it.
    """
    import torch

    if not params.do_sample:
        best, tokens = logits.max(dim=-1)
    else:
        x = logits.float() / float(params.temperature)
        vocab = x.shape[-1]
        if params.top_k and params.top_k < vocab:
            kth = torch.topk(x, int(params.top_k), dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            drop = (probs.cumsum(dim=-1) - probs) >= float(params.top_p)    # the best token always stays
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        u = torch.stack([torch.rand(vocab, generator=g, device=x.device, dtype=torch.float64) for g in generators])
        noisy = x.double() - torch.log(-torch.log(u.clamp_(min=1e-300)))
        best, tokens = noisy.max(dim=-1)
    bad = ~torch.isfinite(best)
    if bool(bad.any()):
        raise FloatingPointError(f"non-finite logits in {int(bad.sum())} row(s) (fp16 overflow or corrupt weights?)")
    return tokens
