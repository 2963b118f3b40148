"""Answer-quality evaluation, split by role (engine-free: no Spark; ``rouge_score``,
``sacrebleu`` and ``rapidfuzz``, the ``eval`` extra, are imported when a record is first scored,
not with these modules):

- :mod:`~dollyflow.core.evaluation.metrics`: per-record metrics of a prediction against its
  reference (ROUGE-1/2/L, BLEU, chrF, SQuAD token F1 and exact match, length ratio), missing and
  empty inputs made explicit.
- :mod:`~dollyflow.core.evaluation.headline`: which metric headlines each Dolly category, and the
  report's text saying why.
- :mod:`~dollyflow.core.evaluation.bootstrap`: seeded percentile bootstrap intervals of means per
  category and overall, and the paired bootstrap of a difference between two models.
- :mod:`~dollyflow.core.evaluation.judge`: the pairwise judge's rubric prompts (both orders),
  strict verdict parsing, position bias cancelled, win rates with intervals.
- :mod:`~dollyflow.core.evaluation.compare`: the evaluate job's aggregates of scored records per
  model (side), the paired comparison against the first side, the headline table.
"""
