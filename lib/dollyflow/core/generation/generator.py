"""The batched generator (:class:`Generator`: prompts, the continuous-batching scheduler and
its decode loop; engine-free: no Spark; the infer job's UDF, benches and notebooks all call it),
for any decoder-only ``AutoModelForCausalLM``.

Prompts are Dolly's generation prompt (:func:`dollyflow.core.prompt.format_inference_prompt`:
intro, ``### Instruction:``, ``Input:`` + context when non-empty, ``### Response:``), or the
tokenizer's chat template's (:mod:`dollyflow.core.prompt_format`; generation then stops at the
template's end-of-turn token or eos). The
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
   GPT-NeoX models (with SDPA attention) decode through
   :class:`dollyflow.core.generation.neox_step.NeoXStep`,
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

Parameters and results are :mod:`dollyflow.core.generation.params`, sampling
:mod:`~dollyflow.core.generation.sampling`, the KV cache :mod:`~dollyflow.core.generation.kv_cache`,
the running batch's state :mod:`~dollyflow.core.generation.batch`.
"""
from __future__ import annotations

import inspect
import time
from collections import deque
from typing import Sequence

from dollyflow.core.generation.batch import Prompt, RunningBatch
from dollyflow.core.generation.kv_cache import can_merge, merge_caches, new_cache
from dollyflow.core.generation.neox_step import NeoXStep, attention_groups, supports
from dollyflow.core.generation.params import FINISH_LENGTH, FINISH_STOP, Generation, GenerationParams
from dollyflow.core.generation.prompts import PromptFitter, describe, resolve_format, split_rows
from dollyflow.core.generation.sampling import next_tokens, row_generators
from dollyflow.core.models.device import release_gpu_memory


class Generator:
    """Batched Dolly generation with one loaded model and tokenizer.

    ``max_positions``: the model's position limit (default: ``config.max_position_embeddings``);
    prompt + ``max_new_tokens`` must fit in it. ``stop_ids``: tokens that end a response
    (default: :func:`dollyflow.core.models.loading.stop_token_ids`). ``batch_tokens``: the running batch's
    rows x (cache width + max_new_tokens) at most; ``max_batch_size``: its rows at most;
    ``prefill_tokens``: padded prompt tokens per prefill forward at most (one prompt at least).
    ``fast``: decode GPT-NeoX models with :class:`~dollyflow.core.generation.neox_step.NeoXStep` (False: always
    through the model's forward; every other architecture always goes through its forward).
    ``prompt_format``: :mod:`dollyflow.core.prompt_format`'s Dolly or chat format (None: Dolly's
    when the tokenizer has its tokens, else the tokenizer's chat template when it has one; the
    infer job passes the one the model directory records).
    """

    def __init__(self, model, tokenizer, params: GenerationParams | None = None, *, batch_tokens: int = 16384,
                 max_batch_size: int = 64, stop_ids: Sequence[int] | None = None,
                 max_positions: int | None = None, prefill_tokens: int = 4096, fast: bool = True,
                 prompt_format=None):
        self.prompt_format, stop_ids = resolve_format(model, tokenizer, prompt_format, stop_ids)
        self.model = model
        self.tokenizer = tokenizer
        self.params = params or GenerationParams()
        self.batch_tokens = int(batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.prefill_tokens = int(prefill_tokens)
        if self.batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("batch_tokens and max_batch_size must be >= 1")
        self.stop_ids = stop_ids
        if not self.stop_ids:
            raise ValueError("no stop token: the tokenizer has neither '### End' nor eos")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        limit = max_positions or getattr(model.config, "max_position_embeddings", None) or 2048
        self._fitter = PromptFitter(tokenizer, self.params, int(limit), self.prompt_format)
        self.max_positions = self._fitter.max_positions
        self.max_prompt_tokens = self._fitter.max_prompt_tokens
        forward = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed past_key_values to cache (the old name is deprecated)
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in forward else None
        # GPT-NeoX decode steps by hand (grouped attention, live rows only): see neox_step.py
        self._step = NeoXStep(model) if fast and supports(model) else None
        self.prefills = 0     # prompt groups run through the model (a batch start or a refill)
        self.retried = 0      # rows retried alone after an exception in their batch

    # -- public -------------------------------------------------------------------------------

    def generate(self, instructions: Sequence[str | None], contexts: Sequence[str | None] | None = None,
                 seeds: Sequence[int | None] | None = None) -> list[Generation]:
        """One :class:`Generation` per row, in the rows' order. ``seeds``: per-row sampling seeds
        (None or missing: :func:`row_seed` of the params' seed and the row's text)."""
        instructions, contexts, seeds = split_rows(instructions, contexts, seeds)
        results: list[Generation | None] = [None] * len(instructions)
        # prompts, bad rows and context trimming: shared with the CTranslate2 engine (prompts.py)
        prompts = self._fitter.prompts(instructions, contexts, seeds, results)
        self._run(prompts, results)
        return results  # type: ignore[return-value]

    # -- running ------------------------------------------------------------------------------

    def _run(self, prompts: list[Prompt], results: list) -> None:
        """Decode every prompt; an exception retries the rows that were running one by one
        (each failing alone becomes that row's error) and goes on with the rest."""
        queue = deque(sorted(prompts, key=lambda p: (-len(p.ids), p.index)))
        while queue:
            running: list[Prompt] = []
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
                        results[row.index] = Generation.failed(describe(exc), len(row.ids), row.trimmed)

    def _release(self) -> None:
        release_gpu_memory()

    def _forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  self._cache_kw: cache, "use_cache": True}
        if last_only and self._keep_kw:
            kwargs[self._keep_kw] = 1
        return self.model(**kwargs).logits[:, -1, :]

    def _admit(self, queue: deque, running: int, width: int) -> list[Prompt]:
        """The next rows to join a batch of ``running`` rows whose cache is ``width`` columns: the
        longest waiting first, while rows x (width + max_new_tokens) fits ``batch_tokens`` (a
        row alone always fits) and there are at most ``max_batch_size`` rows."""
        take: list[Prompt] = []
        room = self.params.max_new_tokens
        while queue and running + len(take) < self.max_batch_size:
            w = max(width, len(queue[0].ids))
            if running + len(take) > 0 and (running + len(take) + 1) * (w + room) > self.batch_tokens:
                break
            take.append(queue.popleft())
            width = w
        return take

    def _chunks(self, rows: list[Prompt], mergeable: bool) -> list[list[Prompt]]:
        """Prefill groups of at most ``prefill_tokens`` padded tokens (one row at least): big
        padded prefills materialise rows x heads x width^2 attention scores where the attention
        kernel has no fused masked path (CPU), and are slower per token than several small ones
        merged into the batch. Unmergeable caches prefill everything at once."""
        if not mergeable:
            return [rows]
        chunks: list[list[Prompt]] = []
        for row in rows:   # longest first: a chunk's first row is its widest
            if chunks and (len(chunks[-1]) + 1) * len(chunks[-1][0].ids) <= self.prefill_tokens:
                chunks[-1].append(row)
            else:
                chunks.append([row])
        return chunks

    def _prefill(self, rows: list[Prompt], device):
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

    def _decode(self, queue: deque, results: list, running: list[Prompt]) -> None:
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
        st = RunningBatch()
        with torch.inference_mode():
            while True:
                width = 0 if st.mask is None else st.mask.shape[1]
                capacity = min(self.max_batch_size, max(1, self.batch_tokens // (width + room)))
                mergeable = st.cache is not None and can_merge(st.cache)
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
                                st.mask = merge_caches(st.cache, st.mask, c2, m2, room, keep)
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
                    groups = attention_groups((st.mask != 0).int().argmax(dim=1).tolist(), live,
                                              st.mask.shape[1])
                    st.rows = [j for j, alive in enumerate(live) if alive]
                    index = None if len(st.rows) == len(live) else torch.tensor(st.rows, device=device)
                    st.rows = st.rows if index is not None else None
                    st.logits = self._step(st.tokens, st.next_pos, st.cache, st.mask, groups, index)
                else:
                    st.logits = self._forward(st.tokens.unsqueeze(-1), st.mask, st.next_pos.unsqueeze(-1),
                                              st.cache, last_only=False)
                st.next_pos = st.next_pos + 1

    def _result(self, row: Prompt, toks: list[int], stopped: bool, seconds: float) -> Generation:
        body = toks[:-1] if stopped else toks
        return Generation(self.tokenizer.decode(body).strip(), FINISH_STOP if stopped else FINISH_LENGTH,
                          len(row.ids), len(toks), None, row.trimmed, round(seconds, 6), list(toks))
