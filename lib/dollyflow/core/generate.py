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
3. Prompts are sorted by length (longest first) and decoded with continuous batching: a batch
   holds at most ``max_batch_size`` rows and rows x (cache width + ``max_new_tokens``) stays
   within ``batch_tokens`` (the KV cache's size), so one long prompt makes a small batch, never
   an out-of-memory; whenever a quarter of that room is free, the next prompts are prefilled and
   join the running batch.
4. The decode loop is hand-written over the model's forward: left padding with position ids
   counted from each row's first real token, a KV cache (transformers' ``DynamicCache`` whose
   layers are preallocated for prompt + ``max_new_tokens``, so a step writes its token in place
   instead of copying the whole cache), logits of the last position only. A row leaves the batch
   when it emits a stop token (``### End`` or eos) or reaches ``max_new_tokens``; the cache,
   mask and positions shrink to the rows still running (in place) and all-padding columns on the
   left are dropped, so finished rows cost nothing and their room goes to waiting prompts.
   GPT-NeoX models (with SDPA attention) decode through :class:`dollyflow.core.neox.NeoXStep`,
   the model's own modules called by hand: each group of rows attends over only the cache
   columns its rows use (most of a mixed-length batch's cache is left padding), and finished
   rows skip attention and the output projection; other models go through their ``forward``.
5. Greedy decoding is the argmax (equal to transformers' ``generate`` greedy output, tested).
   Sampling (temperature, top_k, top_p, in that order, as transformers applies them) uses the
   Gumbel-max trick with a ``torch.Generator`` per row seeded with the row's seed, drawing the
   same numbers at every step whatever else is in the batch: a seeded sample is the same
   whatever batch, window or worker the row lands in (on one kind of device: CPU and CUDA
   generators differ).
6. Any exception in a batch (out of memory, non-finite logits, a bad token) retries the rows
   that were running one by one; a row that still fails becomes that row's error; finished rows
   keep their answers and waiting rows go on in a new batch.

The per-process model cache (:func:`cached`) keeps loaded models across Spark batches and tasks
of one Python worker; :func:`loads` counts the loads.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from dollyflow.core import neox
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
# the generator


class _Batch:
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
        :func:`_merge_caches` to select them in the copy it makes anyway."""
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
            self.mask = _drop_left_padding(self.cache, self.mask)
        return keep


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Generator:
    """Batched Dolly generation with one loaded model and tokenizer.

    ``max_positions``: the model's position limit (default: ``config.max_position_embeddings``);
    prompt + ``max_new_tokens`` must fit in it. ``stop_ids``: tokens that end a response
    (default: :func:`dollyflow.core.model.stop_token_ids`). ``batch_tokens``: the running batch's
    rows x (cache width + max_new_tokens) at most; ``max_batch_size``: its rows at most;
    ``prefill_tokens``: padded prompt tokens per prefill forward at most (one prompt at least).
    ``fast``: decode GPT-NeoX models with :class:`dollyflow.core.neox.NeoXStep` (False: always
    through the model's forward).
    """

    def __init__(self, model, tokenizer, params: GenerationParams | None = None, *, batch_tokens: int = 16384,
                 max_batch_size: int = 64, stop_ids: Sequence[int] | None = None,
                 max_positions: int | None = None, prefill_tokens: int = 4096, fast: bool = True):
        from dollyflow.core.model import check_dolly_tokenizer, stop_token_ids

        check_dolly_tokenizer(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.params = params or GenerationParams()
        self.batch_tokens = int(batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.prefill_tokens = int(prefill_tokens)
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
        # GPT-NeoX decode steps by hand (grouped attention, live rows only): see core/neox.py
        self._step = neox.NeoXStep(model) if fast and neox.supports(model) else None
        self.prefills = 0     # prompt groups run through the model (a batch start or a refill)
        self.retried = 0      # rows retried alone after an exception in their batch

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
        """Decode every prompt; an exception retries the rows that were running one by one
        (each failing alone becomes that row's error) and goes on with the rest."""
        queue = deque(sorted(prompts, key=lambda p: (-len(p.ids), p.index)))
        while queue:
            running: list[_Prompt] = []
            try:
                self._decode(queue, results, running)
            except Exception:  # one bad row must not sink the others: retry the running rows alone
                self._release()
                self.retried += len(running)
                for row in running:
                    try:
                        self._decode(deque([row]), results, [])
                    except Exception as exc:
                        self._release()
                        results[row.index] = Generation.failed(_describe(exc), len(row.ids), row.trimmed)

    def _release(self) -> None:
        _release_gpu_memory()

    def _forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  self._cache_kw: cache, "use_cache": True}
        if last_only and self._keep_kw:
            kwargs[self._keep_kw] = 1
        return self.model(**kwargs).logits[:, -1, :]

    def _admit(self, queue: deque, running: int, width: int) -> list[_Prompt]:
        """The next rows to join a batch of ``running`` rows whose cache is ``width`` columns: the
        longest waiting first, while rows x (width + max_new_tokens) fits ``batch_tokens`` (a
        row alone always fits) and there are at most ``max_batch_size`` rows."""
        take: list[_Prompt] = []
        room = self.params.max_new_tokens
        while queue and running + len(take) < self.max_batch_size:
            w = max(width, len(queue[0].ids))
            if running + len(take) > 0 and (running + len(take) + 1) * (w + room) > self.batch_tokens:
                break
            take.append(queue.popleft())
            width = w
        return take

    def _chunks(self, rows: list[_Prompt], mergeable: bool) -> list[list[_Prompt]]:
        """Prefill groups of at most ``prefill_tokens`` padded tokens (one row at least): big
        padded prefills materialise rows x heads x width^2 attention scores where the attention
        kernel has no fused masked path (CPU), and are slower per token than several small ones
        merged into the batch. Unmergeable caches prefill everything at once."""
        if not mergeable:
            return [rows]
        chunks: list[list[_Prompt]] = []
        for row in rows:   # longest first: a chunk's first row is its widest
            if chunks and (len(chunks[-1]) + 1) * len(chunks[-1][0].ids) <= self.prefill_tokens:
                chunks[-1].append(row)
            else:
                chunks.append([row])
        return chunks

    def _prefill(self, rows: list[_Prompt], device):
        """Left-padded prompts through the model into a new cache: (cache, mask, next positions,
        last logits)."""
        import torch

        self.prefills += 1
        n, width = len(rows), max(len(r.ids) for r in rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask[b, width - len(r.ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = new_cache(self.model, reserve=self.params.max_new_tokens)
        logits = self._forward(ids, mask, positions, cache, last_only=True)
        return cache, mask, positions[:, -1] + 1, logits

    def _decode(self, queue: deque, results: list, running: list[_Prompt]) -> None:
        """The decode loop with continuous batching (see the module docstring): rows from
        ``queue`` join the batch whenever a quarter of its room is free (when the cache can be
        merged), finished rows leave it; results go to ``results``; ``running`` holds the rows
        admitted and not finished (what an exception leaves to retry).

        A finished row stays in the tensors as a dead slot (its extra tokens are ignored) until a
        quarter of the batch is dead or new rows join: compacting the cache copies it, so it is
        done in bulk rather than at every step a row finishes."""
        import torch

        model, params = self.model, self.params
        device = next(model.parameters()).device
        stops = torch.tensor(self.stop_ids, device=device)
        room = params.max_new_tokens
        st = _Batch()
        with torch.inference_mode():
            while True:
                width = 0 if st.mask is None else st.mask.shape[1]
                capacity = min(self.max_batch_size, max(1, self.batch_tokens // (width + room)))
                mergeable = st.cache is not None and _mergeable(st.cache)
                free = capacity - len(running)
                if queue and (not running or (mergeable and free >= max(1, capacity // 4))):
                    new = self._admit(queue, len(running), width)
                    if new:
                        keep = st.compact(device, cache=not mergeable)   # the first merge selects the rows
                        t_new = time.perf_counter()
                        running.extend(new)
                        for chunk in self._chunks(new, mergeable or st.cache is None):
                            c2, m2, p2, l2 = self._prefill(chunk, device)
                            if st.cache is None:
                                st.cache, st.mask, st.next_pos, st.logits = c2, m2, p2, l2
                            else:
                                st.mask = _merge_caches(st.cache, st.mask, c2, m2, room, keep)
                                keep = None
                                st.next_pos = torch.cat([st.next_pos, p2])
                                st.logits = torch.cat([st.logits, l2])
                        if params.do_sample:
                            st.generators += row_generators([r.seed for r in new], device)
                        st.slots += new
                        st.generated += [[] for _ in new]
                        st.started += [t_new] * len(new)
                if not running:
                    return
                slots = range(len(st.slots)) if st.rows is None else st.rows
                generators = [st.generators[j] for j in slots] if params.do_sample else None
                tokens = next_tokens(st.logits, params, generators)
                stopped = torch.isin(tokens, stops).tolist()
                now = time.perf_counter()
                for j, tok, stop in zip(slots, tokens.tolist(), stopped):
                    row = st.slots[j]
                    if row is None:
                        continue
                    toks = st.generated[j]
                    toks.append(tok)
                    if stop or len(toks) >= room:
                        results[row.index] = self._result(row, toks, stop, now - st.started[j])
                        running.remove(row)
                        st.slots[j] = None
                if st.rows is None:
                    st.tokens = tokens
                else:   # finished slots get the pad token (their output is ignored)
                    st.tokens = torch.full((len(st.slots),), self.pad_id, dtype=tokens.dtype, device=device)
                    st.tokens[st.rows] = tokens
                if not running:
                    st.clear()
                    continue
                if st.dead() > len(st.slots) // 4:
                    st.compact(device)
                st.mask = torch.cat([st.mask, st.mask.new_ones((len(st.slots), 1))], dim=-1)
                if self._step is not None:
                    live = [r is not None for r in st.slots]
                    groups = neox.attention_groups((st.mask != 0).int().argmax(dim=1).tolist(), live,
                                                   st.mask.shape[1])
                    st.rows = [j for j, alive in enumerate(live) if alive]
                    index = None if len(st.rows) == len(live) else torch.tensor(st.rows, device=device)
                    st.rows = st.rows if index is not None else None
                    st.logits = self._step(st.tokens, st.next_pos, st.cache, st.mask, groups, index)
                else:
                    st.logits = self._forward(st.tokens.unsqueeze(-1), st.mask, st.next_pos.unsqueeze(-1),
                                              st.cache, last_only=False)
                st.next_pos = st.next_pos + 1

    def _result(self, row: _Prompt, toks: list[int], stopped: bool, seconds: float) -> Generation:
        body = toks[:-1] if stopped else toks
        return Generation(self.tokenizer.decode(body).strip(), FINISH_STOP if stopped else FINISH_LENGTH,
                          len(row.ids), len(toks), None, row.trimmed, round(seconds, 6), list(toks))


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

    _LAYER_CLASS.append(PreallocatedLayer)
    return PreallocatedLayer


def _runs(rows: Sequence[int]):
    """(first source row, first destination row, count) of each run of consecutive ``rows``."""
    runs: list[list[int]] = []
    for dst, src in enumerate(rows):
        if runs and runs[-1][0] + runs[-1][2] == src:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [tuple(r) for r in runs]


def torch_cat_pad(buf, extra: int):
    import torch
    return torch.cat([buf, buf.new_empty((*buf.shape[:2], extra, buf.shape[-1]))], dim=-2)


def _mergeable(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(hasattr(layer, "merge") for layer in layers)


def _merge_caches(cache, mask, other, other_mask, reserve: int, keep: Sequence[int] | None = None):
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
