"""Models: where a model comes from and how it is built and loaded (engine-free).

- :mod:`~dollyflow.core.models.build`: the base causal LM a run starts from (pythia by name, the
  tiny random GPT-NeoX).
- :mod:`~dollyflow.core.models.sources`: a configured model source's kind and its resolution to
  an immutable identity (:class:`~dollyflow.core.models.sources.ModelSource`).
- :mod:`~dollyflow.core.models.cache`: the private per-machine model cache.
- :mod:`~dollyflow.core.models.fetch`: a resolved source's local directory (downloaded once).
- :mod:`~dollyflow.core.models.files`: a model directory's weights, digest, provenance, tokenizer.
- :mod:`~dollyflow.core.models.device`: device and dtype.
- :mod:`~dollyflow.core.models.loading`: a fine-tuned model and tokenizer loaded for generation.
"""
