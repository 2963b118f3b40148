"""Batched Dolly generation (engine-free: no Spark; the infer job's UDF, benches and notebooks
all call it).

Prompts are Dolly's generation prompt (:func:`dollyflow.core.prompt.format_inference_prompt`:
intro, ``### Instruction:``, ``Input:`` + context when non-empty, ``### Response:``). The
response is the text the model generates after ``### Response:`` up to ``### End`` (or eos), or
to the end when ``max_new_tokens`` was reached, decoded as Dolly does
(``tokenizer.decode(ids).strip()``).

How a window of rows is generated (:meth:`Generator.generate`):

1. Rows with a null or blank instruction become errors (``finish_reason="error"``) at once.
2. Each prompt must leave room for ``max_new_tokens`` inside the model's position limit. A longer
   prompt is fitted by trimming its *context from the left* (the end of the passage is kept) at a
   token boundary; if even the prompt without any context is too long, the row is an error. The
   number of context tokens trimmed is reported per row.
3. Prompts are sorted by length (longest first) and cut into batches whose padded size
   ``rows x (longest prompt + max_new_tokens)`` stays within ``batch_tokens`` (and at most
   ``max_batch_size`` rows): one long prompt makes a small batch, never an out-of-memory.
4. Each batch runs a hand-written decode loop over the model's forward: left padding with
   position ids counted from each row's first real token, a KV cache (transformers'
   ``DynamicCache`` whose layers are preallocated for prompt + ``max_new_tokens``, so a step
   writes its token in place instead of copying the whole cache), logits of the last position
   only. A row leaves the batch when it emits a stop token (``### End`` or eos) or reaches
   ``max_new_tokens``; the cache, mask and positions are shrunk to the rows still running and
   all-padding columns on the left are dropped, so finished rows cost nothing.
5. Greedy decoding is the argmax (equal to transformers' ``generate`` greedy output, tested).
   Sampling (temperature, top_k, top_p, in that order, as transformers applies them) uses the
   Gumbel-max trick with a ``torch.Generator`` per row seeded with the row's seed, drawing the
   same numbers at every step whatever else is in the batch: a seeded sample is the same
   whatever batch, window or worker the row lands in (on one kind of device: CPU and CUDA
   generators differ).
6. Any exception in a batch (out of memory, non-finite logits, a bad token) is retried row by
   row; a row that still fails becomes that row's error; the other rows are answered.

The per-process model cache (:func:`cached`) keeps loaded models across Spark batches and tasks
of one Python worker; :func:`loads` counts the loads.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from dollyflow.core.prompt import format_inference_prompt

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ERROR)

ERROR_EMPTY_INSTRUCTION = "empty instruction: nothing to answer"
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class GenerationParams:
    """What decides the generated text (and so belongs in a prediction's identity).

    Dolly's generation defaults are ``do_sample=True, max_new_tokens=256, top_p=0.92, top_k=0``
    (temperature 1). The defaults here keep those values but decode greedily: batch scoring
    should be reproducible run after run; set ``do_sample=True`` for Dolly's sampling.
    """
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.92
    top_k: int = 0
    seed: int = 42

    def __post_init__(self):
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample:
            if not float(self.temperature) > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if not 0 < float(self.top_p) <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if int(self.top_k) < 0:
                raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")

    def to_dict(self) -> dict:
        """The parameters that matter: sampling knobs are dropped when decoding greedily, so
        greedy runs with different (unused) top_p values share one identity."""
        d = asdict(self)
        if not self.do_sample:
            for k in ("temperature", "top_p", "top_k", "seed"):
                d.pop(k)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """16 hex digits of sha256 over :meth:`to_json` (the predictions table's key part)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]


@dataclass
class Generation:
    """One row's answer. ``completion_tokens`` counts every generated token, the stop token
    included (what the model computed); ``response`` excludes it. ``seconds`` is the time from
    the start of the row's batch to the row's last token."""
    response: str | None
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    trimmed_context_tokens: int = 0
    seconds: float | None = None
    token_ids: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def failed(cls, message: str, prompt_tokens: int | None = None, trimmed: int = 0) -> "Generation":
        return cls(None, FINISH_ERROR, prompt_tokens, None, message[:MAX_ERROR_CHARS], trimmed)


@dataclass
class _Prompt:
    index: int               # position in the caller's rows
    ids: list[int]
    seed: int
    trimmed: int = 0


# ---------------------------------------------------------------------------------------------
# seeds and sampling

_MASK64 = (1 << 64) - 1


def row_seed(seed: int, instruction: str | None, context: str | None = None) -> int:
    """A row's default sampling seed: from the run's seed and the row's text, so the same prompt
    draws the same sample wherever it runs (a 63-bit int, fits a Spark long)."""
    text = f"{int(seed)}\x1f{instruction or ''}\x1f{context or ''}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def row_generators(seeds: Sequence[int], device) -> list:
    """One ``torch.Generator`` per row, seeded with the row's seed."""
    import torch
    return [torch.Generator(device=device).manual_seed(int(s) & _MASK64) for s in seeds]


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


# ---------------------------------------------------------------------------------------------
# batching


def plan_batches(lengths: Sequence[int], max_new_tokens: int, batch_tokens: int,
                 max_batch_size: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches, longest prompts first. A batch's padded
    size ``rows x (its longest prompt + max_new_tokens)`` stays within ``batch_tokens`` (a row
    that alone exceeds it runs alone), and holds at most ``max_batch_size`` rows."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        w = lengths[i] + max_new_tokens
        if current and ((len(current) + 1) * max(width, w) > batch_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, w)
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------------------------
# the generator


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Generator:
    """Batched Dolly generation with one loaded model and tokenizer.

    ``max_positions``: the model's position limit (default: ``config.max_position_embeddings``);
    prompt + ``max_new_tokens`` must fit in it. ``stop_ids``: tokens that end a response
    (default: :func:`dollyflow.core.model.stop_token_ids`).
    """

    def __init__(self, model, tokenizer, params: GenerationParams | None = None, *, batch_tokens: int = 16384,
                 max_batch_size: int = 64, stop_ids: Sequence[int] | None = None,
                 max_positions: int | None = None):
        from dollyflow.core.model import check_dolly_tokenizer, stop_token_ids

        check_dolly_tokenizer(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.params = params or GenerationParams()
        self.batch_tokens = int(batch_tokens)
        self.max_batch_size = int(max_batch_size)
        if self.batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("batch_tokens and max_batch_size must be >= 1")
        self.stop_ids = sorted(set(int(i) for i in (stop_ids if stop_ids is not None
                                                    else stop_token_ids(model, tokenizer))))
        if not self.stop_ids:
            raise ValueError("no stop token: the tokenizer has neither '### End' nor eos")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        limit = max_positions or getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_positions = int(limit)
        self.max_prompt_tokens = self.max_positions - self.params.max_new_tokens
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_new_tokens={self.params.max_new_tokens} leaves no room for a prompt "
                             f"in the model's {self.max_positions} positions")
        forward = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed past_key_values to cache (the old name is deprecated)
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in forward else None
        self.batches_run = 0

    # -- public -------------------------------------------------------------------------------

    def generate(self, instructions: Sequence[str | None], contexts: Sequence[str | None] | None = None,
                 seeds: Sequence[int | None] | None = None) -> list[Generation]:
        """One :class:`Generation` per row, in the rows' order. ``seeds``: per-row sampling seeds
        (None or missing: :func:`row_seed` of the params' seed and the row's text)."""
        n = len(instructions)
        contexts = list(contexts) if contexts is not None else [None] * n
        seeds = list(seeds) if seeds is not None else [None] * n
        if not (len(contexts) == len(seeds) == n):
            raise ValueError("instructions, contexts and seeds must have the same length")
        results: list[Generation | None] = [None] * n
        prompts = self._prompts(instructions, contexts, seeds, results)
        self._run(prompts, results)
        return results  # type: ignore[return-value]

    # -- prompts ------------------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []

    def _prompts(self, instructions, contexts, seeds, results) -> list[_Prompt]:
        keep, texts = [], []
        for i, (ins, ctx) in enumerate(zip(instructions, contexts)):
            if ins is not None and not isinstance(ins, str):
                results[i] = Generation.failed(f"instruction must be a string, got {type(ins).__name__}")
            elif ins is None or not ins.strip():
                results[i] = Generation.failed(ERROR_EMPTY_INSTRUCTION)
            elif ctx is not None and not isinstance(ctx, str):
                results[i] = Generation.failed(f"context must be a string, got {type(ctx).__name__}")
            else:
                keep.append(i)
                texts.append(format_inference_prompt(ins, ctx))
        try:
            encoded = self._encode(texts)
        except Exception:  # one odd string must not fail the window: encode row by row
            encoded = []
            for text in texts:
                try:
                    encoded.append(self._encode([text])[0])
                except Exception as exc:
                    encoded.append(exc)
        prompts = []
        for i, ids in zip(keep, encoded):
            if isinstance(ids, Exception):
                results[i] = Generation.failed(_describe(ids))
                continue
            seed = seeds[i] if seeds[i] is not None else row_seed(self.params.seed, instructions[i], contexts[i])
            trimmed = 0
            if len(ids) > self.max_prompt_tokens:
                full = len(ids)
                try:
                    ids, trimmed, error = self._fit(instructions[i], contexts[i], full)
                except Exception as exc:
                    ids, error = None, _describe(exc)
                if ids is None:
                    results[i] = Generation.failed(error, prompt_tokens=full)
                    continue
            prompts.append(_Prompt(i, ids, int(seed) & _MASK64, trimmed))
        return prompts

    def _fit(self, instruction: str, context: str | None, length: int):
        """Trim the context from the left until prompt + max_new_tokens fits the model
        (``(ids, trimmed_tokens, None)``), or ``(None, 0, error)`` when even no context is too
        long."""
        limit = self.max_prompt_tokens
        if context:
            enc = self.tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            drop = length - limit
            while drop < len(offsets):
                kept = context[offsets[drop][0]:].lstrip()
                if not kept:
                    break
                ids = self._encode([format_inference_prompt(instruction, kept)])[0]
                if len(ids) <= limit:
                    return ids, drop, None
                drop += len(ids) - limit
        ids = self._encode([format_inference_prompt(instruction, None)])[0]
        if len(ids) <= limit:
            return ids, len(self.tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0, None
        return None, 0, (f"prompt too long: {len(ids)} tokens without any context; the model's "
                         f"{self.max_positions} positions minus max_new_tokens={self.params.max_new_tokens} "
                         f"leave {limit}")

    # -- running ------------------------------------------------------------------------------

    def _run(self, prompts: list[_Prompt], results: list) -> None:
        lengths = [len(p.ids) for p in prompts]
        for batch in plan_batches(lengths, self.params.max_new_tokens, self.batch_tokens, self.max_batch_size):
            rows = [prompts[j] for j in batch]
            try:
                outs = self._decode(rows)
            except Exception as exc:  # retry row by row: one bad row must not sink the others
                if len(rows) == 1:
                    outs = [Generation.failed(_describe(exc), len(rows[0].ids), rows[0].trimmed)]
                else:
                    self._release()
                    outs = []
                    for row in rows:
                        try:
                            outs.extend(self._decode([row]))
                        except Exception as exc1:
                            self._release()
                            outs.append(Generation.failed(_describe(exc1), len(row.ids), row.trimmed))
            for row, out in zip(rows, outs):
                results[row.index] = out

    def _release(self) -> None:
        _release_gpu_memory()

    def _forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  self._cache_kw: cache, "use_cache": True}
        if last_only and self._keep_kw:
            kwargs[self._keep_kw] = 1
        return self.model(**kwargs).logits[:, -1, :]

    def _decode(self, rows: list[_Prompt]) -> list[Generation]:
        """The decode loop over one batch (see the module docstring)."""
        import torch

        self.batches_run += 1
        t0 = time.perf_counter()
        model, params = self.model, self.params
        device = next(model.parameters()).device
        n = len(rows)
        width = max(len(r.ids) for r in rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask[b, width - len(r.ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        stops = torch.tensor(self.stop_ids, device=device)
        generators = row_generators([r.seed for r in rows], device) if params.do_sample else None
        generated: list[list[int]] = [[] for _ in rows]
        finish: list[str | None] = [None] * n
        seconds: list[float] = [0.0] * n
        active = list(range(n))                  # batch position -> row in ``rows``
        with torch.inference_mode():
            cache = new_cache(model, reserve=params.max_new_tokens)
            logits = self._forward(ids, mask, positions, cache, last_only=True)
            next_pos = positions[:, -1] + 1
            for _step in range(params.max_new_tokens):
                tokens = next_tokens(logits, params, generators)
                stopped = torch.isin(tokens, stops).tolist()
                token_list = tokens.tolist()
                now = time.perf_counter() - t0
                keep = []
                for j, b in enumerate(active):
                    generated[b].append(token_list[j])
                    if stopped[j]:
                        finish[b] = FINISH_STOP
                    elif len(generated[b]) >= params.max_new_tokens:
                        finish[b] = FINISH_LENGTH
                    else:
                        keep.append(j)
                        continue
                    seconds[b] = now
                if not keep:
                    break
                if len(keep) < len(active):      # finished rows leave the batch
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                    if generators is not None:
                        generators = [generators[j] for j in keep]
                    active = [active[j] for j in keep]
                    mask = _drop_left_padding(cache, mask)
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
                logits = self._forward(tokens.unsqueeze(-1), mask, next_pos.unsqueeze(-1), cache, last_only=False)
                next_pos = next_pos + 1
        out = []
        for b, r in enumerate(rows):
            toks = generated[b]
            body = toks[:-1] if finish[b] == FINISH_STOP else toks
            out.append(Generation(self.tokenizer.decode(body).strip(), finish[b] or FINISH_LENGTH, len(r.ids),
                                  len(toks), None, r.trimmed, round(seconds[b], 6), toks))
        return out


def _drop_left_padding(cache, mask):
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


_LAYER_CLASS: list = []


def _preallocated_layer_class():
    """A transformers ``DynamicLayer`` whose keys and values live in a buffer sized for the
    prompt plus ``reserve`` new tokens: each decoding step writes its token in place instead of
    concatenating (copying) the whole cache, as ``DynamicLayer`` does."""
    if _LAYER_CLASS:
        return _LAYER_CLASS[0]
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
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
                self._k = torch_cat_pad(self._k, grow)
                self._v = torch_cat_pad(self._v, grow)
            self._k[:, :, self.length:self.length + add] = key_states
            self._v[:, :, self.length:self.length + add] = value_states
            self.length += add
            self.keys = self._k[:, :, :self.length]
            self.values = self._v[:, :, :self.length]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys = self._k[:, :, :self.length]
                self.values = self._v[:, :, :self.length]

        def drop_left(self, n: int) -> None:
            self._k, self._v = self._k[:, :, n:], self._v[:, :, n:]
            self.length -= n
            self.keys = self._k[:, :, :self.length]
            self.values = self._v[:, :, :self.length]

        def reset(self) -> None:
            self.length = 0
            self._k = self._v = None
            super().reset()

    _LAYER_CLASS.append(PreallocatedLayer)
    return PreallocatedLayer


def torch_cat_pad(buf, extra: int):
    import torch
    return torch.cat([buf, buf.new_empty((*buf.shape[:2], extra, buf.shape[-1]))], dim=-2)


def new_cache(model, reserve: int):
    """A ``DynamicCache`` for ``model``; when all its layers are plain ``DynamicLayer`` (GPT-NeoX
    and most decoder-only models), with :func:`_preallocated_layer_class` layers instead."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer).__name__ == "DynamicLayer" for layer in layers):
        cls = _preallocated_layer_class()
        cache.layers = [cls(reserve) for _ in layers]
    return cache


# ---------------------------------------------------------------------------------------------
# per-process cache of loaded models (one load per Python worker)

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
            _release_gpu_memory()
        value = load()
        _CACHE[key] = value
        _LOADS[0] += 1
        return value, True


def _release_gpu_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loads() -> int:
    """How many models this process has loaded through :func:`cached`."""
    return _LOADS[0]


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
