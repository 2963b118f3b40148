"""A hand-written GPT-NeoX decode step for the generation core (engine-free).

The generation loop's decode step is one new token per running row on top of the preallocated KV
cache (:func:`dollyflow.core.generation.kv_cache.new_cache`). Through transformers' forward every row
attends over the whole padded cache width, and every row goes through the 50k-vocabulary output
projection. The batch holds rows of very different lengths (prompts sorted longest first, rows
joining a running batch right-aligned on its width), so on the bench's prompts ~70% of the keys
and values read per step are padding; and a finished row stays in the batch until the cache is
compacted. This step runs the model's own modules and weights (embedding, per layer: layer
norms, fused qkv, partial rotary, attention, dense, MLP with parallel or sequential residual,
final norm, output projection) with the same operations as transformers' GPT-NeoX, except:

- attention runs per *group* of consecutive rows (:func:`attention_groups`), each over only the
  cache columns its rows use (keys and values are views, not copies); finished rows attend to
  nothing (their output is ignored);
- the output projection runs for the rows still generating only.

Masked columns contribute exactly zero to attention, so the logits equal transformers' up to
float summation order (greedy outputs are tested token for token against ``generate``).
"""
from __future__ import annotations

from typing import Sequence

# a group's extra attention call costs about as much as reading this many (row, column) pairs of
# keys and values: consecutive rows are grouped unless splitting saves more padding than this
GROUP_COST_COLUMNS = 256


def supports(model) -> bool:
    """Whether :class:`NeoXStep` reproduces ``model``'s forward: a GPT-NeoX causal LM with SDPA
    attention and the default (unscaled) rotary embedding."""
    cfg = getattr(model, "config", None)
    if type(model).__name__ != "GPTNeoXForCausalLM" or cfg is None:
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    return (getattr(cfg, "_attn_implementation", None) == "sdpa" and rope.get("rope_type", "default") == "default"
            and hasattr(model, "gpt_neox") and hasattr(model, "lm_head"))


def attention_groups(starts: Sequence[int], live: Sequence[bool], width: int) -> list[tuple[int, int, int, bool]]:
    """``(first_row, end_row, first_column, masked)`` of each attention group: runs of
    consecutive live rows (``live``), cut where a row's first real column (``starts``) differs
    enough from its group's that a separate attention call reads fewer padded (row, column)
    pairs than it costs. ``masked``: some row of the group starts after the group's first column
    (its attention needs the padding mask)."""
    groups: list[list] = []
    for j, (s, alive) in enumerate(zip(starts, live)):
        if not alive:
            continue
        if groups and groups[-1][1] == j:
            a, _, low, high = groups[-1]
            rows = j - a
            joined = (rows + 1) * (width - min(low, s))
            apart = rows * (width - low) + (width - s) + GROUP_COST_COLUMNS
            if joined <= apart:
                groups[-1][1:] = [j + 1, min(low, s), max(high, s)]
                continue
        groups.append([j, j + 1, s, s])
    return [(a, e, low, high > low) for a, e, low, high in groups]


class NeoXStep:
    """``step(tokens, positions, cache, mask, groups, rows)``: the logits of one decode step, for
    the batch rows ``rows`` (a LongTensor of row indices, None: all) in that order.

    ``tokens``, ``positions``: (batch,) the new token and its position id per row; ``cache``: a
    :func:`~dollyflow.core.generation.kv_cache.new_cache` cache (its layers take the new keys and values in
    place); ``mask``: (batch, cache length + 1) the attention mask, this step's column included;
    ``groups``: :func:`attention_groups` of its rows.
    """

    def __init__(self, model):
        base = model.gpt_neox
        self.embed, self.layers, self.norm, self.head = base.embed_in, base.layers, base.final_layer_norm, model.lm_head
        self.inv_freq = base.rotary_emb.inv_freq
        self.scaling = float(base.rotary_emb.attention_scaling)
        self.parallel = bool(model.config.use_parallel_residual)
        self.hidden = int(model.config.hidden_size)
        self.heads = int(model.config.num_attention_heads)

    def rotary(self, positions, dtype):
        import torch
        freqs = positions[:, None, None, None].float() * self.inv_freq.to(device=positions.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)    # (batch, 1, 1, rotary dims), broadcast over heads
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def __call__(self, tokens, positions, cache, mask, groups, rows=None):
        import torch.nn.functional as F

        b, h, n = tokens.shape[0], self.heads, self.hidden
        x = self.embed(tokens[:, None])                                  # (batch, 1, hidden)
        cos, sin = self.rotary(positions, x.dtype)
        allowed = mask.bool()[:, None, None, :]                          # (batch, 1, 1, width)
        for layer, block in zip(cache.layers, self.layers):
            attn = block.attention
            qkv = attn.query_key_value(block.input_layernorm(x)).view(b, 1, h, -1).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=-1)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys, values = layer.update(k, v)
            out = q.new_zeros((b, h, 1, q.shape[-1]))
            for a, e, first, masked in groups:
                out[a:e] = F.scaled_dot_product_attention(
                    q[a:e], keys[a:e, :, first:], values[a:e, :, first:],
                    attn_mask=allowed[a:e, ..., first:] if masked else None, scale=attn.scaling)
            out = attn.dense(out.transpose(1, 2).reshape(b, 1, n))
            if self.parallel:
                x = block.mlp(block.post_attention_layernorm(x)) + out + x
            else:
                out = out + x
                x = block.mlp(block.post_attention_layernorm(out)) + out
        x = x[:, 0] if rows is None else x[rows, 0]
        return self.head(self.norm(x))


def _rotate(x, cos, sin):
    """Rotary embedding on the first ``cos.shape[-1]`` dims of each head (GPT-NeoX's partial
    rotary), the rest passed through."""
    import torch
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half = torch.cat((-rot[..., d // 2:], rot[..., :d // 2]), dim=-1)
    return torch.cat((rot * cos + half * sin, rest), dim=-1)
