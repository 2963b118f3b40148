"""The CTranslate2 engine (:class:`CT2Generator`): Dolly generation through a CTranslate2 model,
under the torch core's contract (:class:`dollyflow.core.generation.generator.Generator`): the
same prompts, error rows and context trimming (both build them with
:class:`~dollyflow.core.generation.prompts.PromptFitter`), the same :class:`Generation` fields.
Engine-free; ``ctranslate2`` is imported when a generator is built, never when this module loads.

- :func:`available`, :func:`require`, :data:`INSTALL_HINT`, :func:`supports`, :func:`converted_dir`:
  the package and the conversion cache (:mod:`~dollyflow.core.generation.ct2_convert`).
- :data:`COMPUTE_TYPES`, :func:`check_compute_type`: ``infer.compute_type`` against the device.

Greedy decoding is one batched ``generate_batch`` (beam 1, top-k 1, prompts as token strings,
``max_batch_size`` in tokens, stop tokens ``### End``/eos returned with the result); on CPU in
float32 its tokens equal the torch core's. ``seconds`` of a row is the time of the call that
generated it. An exception in a batched call retries its rows one by one; a row that still
fails becomes that row's error.

Sampling (``do_sample``) uses CTranslate2's own sampler (temperature, top-k, top-p) and is **not
reproducible per row**: CTranslate2 4.x has no per-request seed for text generation, its sampler
draws from one random stream per replica thread, seeded once (from the seed set when the
thread first samples). :class:`CT2Generator` sets ``params.seed`` before it starts its replicas,
so a fresh generator with ``inter_threads=1`` fed the same calls in the same order repeats its
samples; a row's sample still depends on what the replica sampled before it, and the row seeds
are ignored. Seeded per-row samples that do not depend on batch, window or worker are the
torch engine's (and differ from CTranslate2's). CTranslate2 does not report non-finite logits:
a row of a corrupt model yields tokens, not an error.
"""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Sequence

from dollyflow.core.generation.batch import Prompt
from dollyflow.core.generation.ct2_convert import (INSTALL_HINT, available, conversions, converted_dir,
                                                   read_marker, require, supports)
from dollyflow.core.generation.params import FINISH_LENGTH, FINISH_STOP, Generation, GenerationParams
from dollyflow.core.generation.prompts import PromptFitter, describe, resolve_format, split_rows

__all__ = ["available", "require", "INSTALL_HINT", "supports", "converted_dir", "conversions", "COMPUTE_TYPES",
           "check_compute_type", "CT2Generator"]

COMPUTE_TYPES = ("default", "float32", "int8", "int8_float16", "bfloat16", "float16")


def check_compute_type(compute_type: str, device: str) -> str:
    """``compute_type`` when CTranslate2 supports it on ``device`` (``cpu``, ``cuda``), else a
    ValueError naming ``infer.compute_type``, the value and the device's supported set.
    ``default`` is always accepted and returned as is: CTranslate2 then keeps the converted
    weights' type, or the nearest one the device supports."""
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(f"infer.compute_type={compute_type!r} is not one of {', '.join(COMPUTE_TYPES)}")
    require()
    import ctranslate2

    kind = "cuda" if str(device).startswith("cuda") else str(device)
    try:
        supported = sorted(ctranslate2.get_supported_compute_types(kind))
    except Exception as exc:
        raise ValueError(f"infer.compute_type={compute_type!r}: CTranslate2 cannot run on device {device!r} "
                         f"({describe(exc)})") from exc
    if compute_type != "default" and compute_type not in supported:
        raise ValueError(f"infer.compute_type={compute_type!r} is not supported by CTranslate2 on {device} "
                         f"(supported there: {', '.join(supported)})")
    return compute_type


class CT2Generator:
    """Batched Dolly generation with a CTranslate2 model directory (:func:`converted_dir`) and the
    model's tokenizer.

    ``max_positions``: the model's position limit (default: the source config's
    ``max_position_embeddings`` recorded at conversion, else 2048); prompt + ``max_new_tokens``
    must fit in it. ``stop_ids``: tokens that end a response (default: the source generation
    config's eos ids, ``### End`` and the tokenizer's eos, as the torch core).
    ``max_batch_tokens``: CTranslate2's ``max_batch_size`` in tokens (it sorts the prompts by
    length and splits them). ``inter_threads``: replicas decoding batches in parallel;
    ``intra_threads``: threads per replica (0: CTranslate2's default).
    """

    def __init__(self, ct2_dir: str, tokenizer, params: GenerationParams | None = None, *, device: str = "cpu",
                 compute_type: str = "default", inter_threads: int = 1, intra_threads: int = 0,
                 max_batch_tokens: int = 2048, max_positions: int | None = None,
                 stop_ids: Sequence[int] | None = None, prompt_format=None):
        require()
        import ctranslate2

        self.ct2_dir = ct2_dir
        self.tokenizer = tokenizer
        self.params = params or GenerationParams()
        self.device = device
        self.compute_type = check_compute_type(compute_type, device)
        self.max_batch_tokens = int(max_batch_tokens)
        if self.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")
        info = read_marker(ct2_dir) or {}
        with open(os.path.join(ct2_dir, "vocabulary.json"), encoding="utf-8") as f:
            self.vocabulary_size = len(json.load(f))
        if len(tokenizer) > self.vocabulary_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the CTranslate2 model's vocabulary only "
                             f"{self.vocabulary_size}: tokenizer and weights do not belong together")
        source = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=info.get("eos_token_ids")))
        self.prompt_format, self.stop_ids = resolve_format(source, tokenizer, prompt_format, stop_ids)
        if not self.stop_ids:
            raise ValueError("no stop token: the tokenizer has neither '### End' nor eos")
        limit = max_positions or info.get("max_positions") or 2048
        self._fitter = PromptFitter(tokenizer, self.params, int(limit), self.prompt_format)
        self.max_positions = self._fitter.max_positions
        self.max_prompt_tokens = self._fitter.max_prompt_tokens
        if self.params.do_sample:
            ctranslate2.set_random_seed(int(self.params.seed) & 0xFFFFFFFF)   # replicas' streams (see module doc)
        self.generator = ctranslate2.Generator(ct2_dir, device=device, compute_type=self.compute_type,
                                               inter_threads=int(inter_threads), intra_threads=int(intra_threads))
        self.calls = 0      # generate_batch calls
        self.retried = 0    # rows retried alone after an exception in their call

    # -- public -------------------------------------------------------------------------------

    def generate(self, instructions: Sequence[str | None], contexts: Sequence[str | None] | None = None,
                 seeds: Sequence[int | None] | None = None) -> list[Generation]:
        """One :class:`Generation` per row, in the rows' order (as
        :meth:`dollyflow.core.generation.generator.Generator.generate`; ``seeds`` are checked and
        ignored: see the module doc on sampling)."""
        instructions, contexts, seeds = split_rows(instructions, contexts, seeds)
        results: list[Generation | None] = [None] * len(instructions)
        prompts = self._fitter.prompts(instructions, contexts, seeds, results)
        if prompts:
            try:
                self._run(prompts, results)
            except Exception:   # one bad row must not sink the others: retry the rows alone
                self.retried += len(prompts)
                for row in prompts:
                    try:
                        self._run([row], results)
                    except Exception as exc:
                        results[row.index] = Generation.failed(describe(exc), len(row.ids), row.trimmed)
        return results  # type: ignore[return-value]

    # -- running ------------------------------------------------------------------------------

    def options(self) -> dict:
        """The ``generate_batch`` options of these params."""
        p = self.params
        opts = dict(max_batch_size=self.max_batch_tokens, batch_type="tokens", beam_size=1,
                    max_length=p.max_new_tokens, min_length=0, include_prompt_in_result=False,
                    end_token=list(self.stop_ids), return_end_token=True)
        if p.do_sample:
            opts.update(sampling_topk=int(p.top_k) if p.top_k else 0, sampling_topp=float(p.top_p),
                        sampling_temperature=float(p.temperature))
        else:
            opts.update(sampling_topk=1)
        return opts

    def _run(self, rows: list[Prompt], results: list) -> None:
        start = time.perf_counter()
        self.calls += 1
        outs = self.generator.generate_batch([self.tokenizer.convert_ids_to_tokens(r.ids) for r in rows],
                                             **self.options())
        seconds = round(time.perf_counter() - start, 6)
        done = [self._result(row, list(out.sequences_ids[0]), seconds) for row, out in zip(rows, outs)]
        for row, gen in zip(rows, done):
            results[row.index] = gen

    def _result(self, row: Prompt, toks: list[int], seconds: float) -> Generation:
        stopped = bool(toks) and toks[-1] in self.stop_ids
        if len(toks) > self.params.max_new_tokens or (not stopped and len(toks) < self.params.max_new_tokens):
            raise RuntimeError(f"CTranslate2 returned {len(toks)} tokens for max_new_tokens="
                               f"{self.params.max_new_tokens} without a stop token")
        body = toks[:-1] if stopped else toks
        return Generation(self.tokenizer.decode(body).strip(), FINISH_STOP if stopped else FINISH_LENGTH,
                          len(row.ids), len(toks), None, row.trimmed, seconds, toks)
