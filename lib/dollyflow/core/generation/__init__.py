"""Batched Dolly generation, split by role (engine-free: no Spark; torch is imported when a model
runs, not with these modules):

- :mod:`~dollyflow.core.generation.params`: :class:`GenerationParams`, :class:`Generation`, the
  finish reasons.
- :mod:`~dollyflow.core.generation.sampling`: row seeds, per-row generators, the next token.
- :mod:`~dollyflow.core.generation.prompts`: Dolly prompts, error rows and context trimming, shared
  by both engines.
- :mod:`~dollyflow.core.generation.generator`: the torch core's :class:`Generator` (continuous
  batching, the decode loop, retries).
- :mod:`~dollyflow.core.generation.ct2`: the CTranslate2 engine (:class:`CT2Generator`, compute
  types); :mod:`~dollyflow.core.generation.ct2_convert`: the package check and the conversion cache.
- :mod:`~dollyflow.core.generation.batch`: the decode loop's running batch.
- :mod:`~dollyflow.core.generation.kv_cache`: the preallocated KV cache and its merge/shrink helpers.
- :mod:`~dollyflow.core.generation.neox_step`: the hand-written GPT-NeoX decode step.
- :mod:`~dollyflow.core.generation.worker_cache`: the per-process cache of loaded models.
"""
