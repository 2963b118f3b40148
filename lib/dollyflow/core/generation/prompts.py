"""Prompts for every generation engine (:class:`PromptFitter`; Dolly's or a chat template's,
:mod:`dollyflow.core.prompt_format`): the checks that turn a bad row
into an error row (null, blank or non-string instruction, non-string context, a string the
tokenizer cannot encode, a prompt too long even without context), the encoding, and the fitting
of a long prompt into the model's positions by trimming its context from the left. The torch
core (:mod:`~dollyflow.core.generation.generator`) and the CTranslate2 engine
(:mod:`~dollyflow.core.generation.ct2`) both build their prompts here, so their error rows are
identical by construction. Engine-free: no torch."""
from __future__ import annotations

from dollyflow.core.generation.batch import Prompt
from dollyflow.core.generation.params import ERROR_EMPTY_INSTRUCTION, Generation, GenerationParams
from dollyflow.core.generation.sampling import MASK64, row_seed
from dollyflow.core.models.loading import check_dolly_tokenizer, stop_token_ids
from dollyflow.core.prompt_format import DollyFormat, format_from_info


def describe(exc: BaseException) -> str:
    """An exception as a row's error text."""
    return f"{type(exc).__name__}: {exc}"


class PromptFitter:
    """Prompts of one tokenizer within ``max_positions`` (prompt + ``params.max_new_tokens`` must
    fit). ValueError when ``max_new_tokens`` leaves no room for a prompt."""

    def __init__(self, tokenizer, params: GenerationParams, max_positions: int, prompt_format=None):
        self.tokenizer = tokenizer
        self.format = prompt_format or DollyFormat()
        self.params = params
        self.max_positions = int(max_positions)
        self.max_prompt_tokens = self.max_positions - params.max_new_tokens
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt "
                             f"in the model's {self.max_positions} positions")

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=self.format.add_special_tokens)["input_ids"] if texts else []

    def _text(self, instruction, context):
        try:
            return self.format.prompt_text(instruction, context)
        except Exception as exc:   # a template that refuses a row: that row's error
            return exc

    def prompts(self, instructions, contexts, seeds, results) -> list[Prompt]:
        """The :class:`Prompt` of every good row (its index, ids, seed, context tokens trimmed);
        a bad row's :class:`Generation` error goes to ``results[i]`` instead."""
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
                texts.append(self._text(ins, ctx))
        failed = {k: t for k, t in enumerate(texts) if isinstance(t, Exception)}
        texts = ["" if isinstance(t, Exception) else t for t in texts]
        try:
            encoded = self.encode(texts)
        except Exception:  # one odd string must not fail the window: encode row by row
            encoded = []
            for text in texts:
                try:
                    encoded.append(self.encode([text])[0])
                except Exception as exc:
                    encoded.append(exc)
        encoded = [failed.get(k, ids) for k, ids in enumerate(encoded)]
        prompts = []
        for i, ids in zip(keep, encoded):
            if isinstance(ids, Exception):
                results[i] = Generation.failed(describe(ids))
                continue
            seed = seeds[i] if seeds[i] is not None else row_seed(self.params.seed, instructions[i], contexts[i])
            trimmed = 0
            if len(ids) > self.max_prompt_tokens:
                full = len(ids)
                try:
                    ids, trimmed, error = self.fit(instructions[i], contexts[i], full)
                except Exception as exc:
                    ids, error = None, describe(exc)
                if ids is None:
                    results[i] = Generation.failed(error, prompt_tokens=full)
                    continue
            prompts.append(Prompt(i, ids, int(seed) & MASK64, trimmed))
        return prompts

    def fit(self, instruction: str, context: str | None, length: int):
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
                ids = self.encode([self.format.prompt_text(instruction, kept)])[0]
                if len(ids) <= limit:
                    return ids, drop, None
                drop += len(ids) - limit
        ids = self.encode([self.format.prompt_text(instruction, None)])[0]
        if len(ids) <= limit:
            return ids, len(self.tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0, None
        return None, 0, (f"prompt too long: {len(ids)} tokens without any context; the model's "
                         f"{self.max_positions} positions minus max_new_tokens={self.params.max_new_tokens} "
                         f"leave {limit}")


def split_rows(instructions, contexts, seeds) -> tuple[list, list, list]:
    """The rows' contexts and seeds as lists of the instructions' length (None when not given);
    ValueError when their lengths differ."""
    n = len(instructions)
    contexts = list(contexts) if contexts is not None else [None] * n
    seeds = list(seeds) if seeds is not None else [None] * n
    if not (len(contexts) == len(seeds) == n):
        raise ValueError("instructions, contexts and seeds must have the same length")
    return list(instructions), contexts, seeds


def resolve_format(model, tokenizer, prompt_format=None, stop_ids=None):
    """(format, stop ids) of a generator: ``prompt_format`` None is the one the tokenizer implies
    (:func:`~dollyflow.core.prompt_format.format_from_info` with nothing recorded). Dolly's format
    needs Dolly's tokens (:func:`~dollyflow.core.models.loading.check_dolly_tokenizer`); stop ids
    default to the generation config's eos ids and the format's own (``### End``/eos, or the
    template's end-of-turn token/eos)."""
    fmt = prompt_format if prompt_format is not None else format_from_info(None, tokenizer)
    if fmt.name == "dolly":
        check_dolly_tokenizer(tokenizer)
    if stop_ids is None:
        stop_ids = stop_token_ids(model, tokenizer) if fmt.name == "dolly" else \
            stop_token_ids(model, tokenizer, end_key=False) + fmt.stop_ids(tokenizer)
    return fmt, sorted(set(int(i) for i in stop_ids))
