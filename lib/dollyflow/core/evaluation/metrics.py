"""Per-record answer-quality metrics: a prediction against its reference response (engine-free).

Every metric is on a 0..1 scale (BLEU and chrF are sacrebleu's 0..100 scores divided by 100), so
they aggregate and plot alike:

- ``rouge1``, ``rouge2``, ``rougeL``: ROUGE F-measures from Google's ``rouge-score`` (the
  ROUGE-1.5.5 reimplementation) with the Porter stemmer, i.e. ``RougeScorer(types,
  use_stemmer=True)``. Its tokenizer keeps only ``[a-z0-9]`` runs after lowercasing, so text in
  other scripts has no ROUGE tokens (score 0).
- ``bleu``, ``chrf``: sacrebleu's ``sentence_bleu`` (exponential smoothing, effective order) and
  ``sentence_chrf`` with one reference.
- ``token_f1``, ``exact_match``: SQuAD's definitions (:func:`token_f1`, :func:`exact_match`).
- ``length_ratio``: prediction whitespace tokens / reference whitespace tokens.

Missing and empty inputs are explicit, never a crash and never a silent 0 (``reason``):

- no reference (``None``/NaN: :data:`MISSING_REFERENCE`) or a blank one (:data:`EMPTY_REFERENCE`):
  every metric is ``None``: there is nothing to score against;
- no prediction (:data:`MISSING_PREDICTION`, e.g. a failed generation) or a blank one
  (:data:`EMPTY_PREDICTION`): every metric is 0, and the row says why.

``rouge_score`` and ``sacrebleu`` (the ``eval`` extra) are imported when a record is first
scored, so importing this module needs neither. The ROUGE scorer is built once per process.
"""
from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from types import SimpleNamespace
from typing import Any, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
#: The metric columns of a scored record, in order (``reason`` comes beside them).
METRICS = ROUGE_TYPES + ("bleu", "chrf", "token_f1", "exact_match", "length_ratio")

MISSING_PREDICTION = "missing_prediction"
EMPTY_PREDICTION = "empty_prediction"
MISSING_REFERENCE = "missing_reference"
EMPTY_REFERENCE = "empty_reference"
#: Reasons whose rows have no metrics (``None``), as against scored-as-zero rows.
UNSCORED = (MISSING_REFERENCE, EMPTY_REFERENCE)

#: Porter stems remembered per process (words are Zipf-distributed: a small cache hits most).
STEM_CACHE_SIZE = 1 << 18

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --- SQuAD ------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop ASCII punctuation, drop the articles
    a/an/the, collapse whitespace (in that order, as the official v1.1/v2.0 script)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of the normalised answers: the harmonic mean of precision and recall of
    the multiset of tokens they share. When either side normalises to no tokens, 1.0 if both do
    and 0.0 otherwise (SQuAD v2.0's rule).

    Written here rather than taken from a library: it is SQuAD's definition in ten lines, and the
    libraries that carry it (HF ``evaluate``'s ``squad`` metric) fetch their metric scripts from the
    hub at run time, which a cluster without hub access cannot do.
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """SQuAD's exact match: 1.0 when the normalised answers are equal, else 0.0 (a library is
    not used for the reason given in :func:`token_f1`)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def length_ratio(prediction: str, reference: str) -> float | None:
    """Prediction whitespace tokens / reference whitespace tokens; ``None`` when the reference
    has none."""
    ref = len(reference.split())
    return len(prediction.split()) / ref if ref else None


# --- the libraries ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def rouge_scorer():
    """The process's ROUGE scorer: ``RougeScorer(ROUGE_TYPES, use_stemmer=True)`` made once,
    with one change that does not alter a score: its tokenizer remembers Porter stems
    (``rouge-score`` stems every word of every text anew, over half of its time)."""
    from nltk.stem import porter
    from rouge_score import rouge_scorer as rs
    from rouge_score import tokenize, tokenizers

    stemmer = SimpleNamespace(stem=functools.lru_cache(maxsize=STEM_CACHE_SIZE)(porter.PorterStemmer().stem))

    class StemCachingTokenizer(tokenizers.Tokenizer):
        """``rouge_score``'s DefaultTokenizer(use_stemmer=True), stems remembered."""

        def tokenize(self, text):
            return tokenize.tokenize(text, stemmer)

    return rs.RougeScorer(list(ROUGE_TYPES), tokenizer=StemCachingTokenizer())


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of ``prediction`` against ``reference``."""
    scores = rouge_scorer().score(reference, prediction)   # rouge-score's order: (target, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def bleu(prediction: str, reference: str) -> float:
    """sacrebleu's sentence BLEU, 0..1 (a perfect match's 100.00000000000004 is 1.0)."""
    import sacrebleu
    return min(1.0, sacrebleu.sentence_bleu(prediction, [reference]).score / 100.0)


def chrf(prediction: str, reference: str) -> float:
    """sacrebleu's sentence chrF, 0..1 (clamped like :func:`bleu`)."""
    import sacrebleu
    return min(1.0, sacrebleu.sentence_chrf(prediction, [reference]).score / 100.0)


# --- a record, a batch ------------------------------------------------------------------------

def _absence(value: Any, missing: str, empty: str) -> str | None:
    """The reason ``value`` cannot be scored as text, or None when it is a non-blank string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if not isinstance(value, str):
        raise TypeError(f"expected a string or None, got {type(value).__name__}")
    return None if value.strip() else empty


def _filled(value: float | None, reason: str | None) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(METRICS, value)
    out["reason"] = reason
    return out


def score(prediction: str | None, reference: str | None) -> dict[str, Any]:
    """Every metric of :data:`METRICS` for one record, and ``reason`` (None when both sides are
    text; see the module docstring for the rest)."""
    reason = _absence(reference, MISSING_REFERENCE, EMPTY_REFERENCE)
    if reason:
        return _filled(None, reason)
    reason = _absence(prediction, MISSING_PREDICTION, EMPTY_PREDICTION)
    if reason:
        return _filled(0.0, reason)
    out: dict[str, Any] = rouge(prediction, reference)
    out["bleu"] = bleu(prediction, reference)
    out["chrf"] = chrf(prediction, reference)
    out["token_f1"] = token_f1(prediction, reference)
    out["exact_match"] = exact_match(prediction, reference)
    out["length_ratio"] = length_ratio(prediction, reference)
    out["reason"] = None
    return out


def score_many(predictions: Sequence[str | None], references: Sequence[str | None]) -> dict[str, list]:
    """:func:`score` of aligned predictions and references, as columns: ``{metric: [value per
    record]}`` for every metric of :data:`METRICS`, and ``reason``. ValueError when the lengths
    differ."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    columns: dict[str, list] = {name: [] for name in METRICS + ("reason",)}
    for pred, ref in zip(predictions, references):
        for name, value in score(pred, ref).items():
            columns[name].append(value)
    return columns
