"""Per-record answer-quality metrics: a prediction against its reference response (engine-free).

Every metric is on a 0..1 scale (BLEU and chrF are sacrebleu's 0..100 scores divided by 100), so
they aggregate and plot alike:

- ``rouge1``, ``rouge2``, ``rougeL``: ROUGE F-measures as Google's ``rouge-score`` (the
  ROUGE-1.5.5 reimplementation) computes them with the Porter stemmer, i.e. what ``RougeScorer(
  types, use_stemmer=True).score`` returns, equal to the last bit. Its tokenizer keeps only
  ``[a-z0-9]`` runs after lowercasing, so text in other scripts has no ROUGE tokens (score 0).
- ``bleu``, ``chrf``: sacrebleu's ``sentence_bleu`` (exponential smoothing, effective order) and
  ``sentence_chrf`` with one reference.
- ``token_f1``, ``exact_match``: SQuAD's definitions (:func:`token_f1`, :func:`exact_match`).
- ``length_ratio``: prediction whitespace tokens / reference whitespace tokens.

How ROUGE is computed, and why: ``rouge-score`` stays the reference library -- its tokenizer and
Porter stemmer make the tokens, and its ``scoring.fmeasure`` the F-measures -- but a record is
scored by :func:`rouge_of_tokens` rather than by ``RougeScorer.score``, which spends most of its
time (~80% on Dolly-length answers) in a pure-Python longest-common-subsequence table, O(n x m)
list operations per record. Here the LCS length comes from ``rapidfuzz``
(``rapidfuzz.distance.LCSseq``, a maintained C++ library with a bit-parallel LCS), over the
tokens mapped to small integers per record (rapidfuzz compares other objects by their hash, which
could collide); precision, recall and F are then ``rouge-score``'s ``_score_lcs`` arithmetic, and
ROUGE-1/2 its n-gram counting with ``collections.Counter``. Each text is tokenized once for the
three ROUGE types, stems are remembered per process (``rouge-score`` stems every word of every
text anew). tests/core/evaluation/test_eval_metrics.py checks every value against
``RougeScorer.score`` and sacrebleu's ``sentence_*`` functions on hundreds of varied pairs.

Missing and empty inputs are explicit, never a crash and never a silent 0 (``reason``):

- no reference (``None``/NaN: :data:`MISSING_REFERENCE`) or a blank one (:data:`EMPTY_REFERENCE`):
  every metric is ``None``: there is nothing to score against;
- no prediction (:data:`MISSING_PREDICTION`, e.g. a failed generation) or a blank one
  (:data:`EMPTY_PREDICTION`): every metric is 0, and the row says why.

``rouge_score``, ``sacrebleu`` and ``rapidfuzz`` (the ``eval`` extra) are imported when a record
is first scored, so importing this module needs none of them. The tokenizer, the scorer and
sacrebleu's metric objects are built once per process.
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

#: str.translate table deleting ASCII punctuation (SQuAD's ``set(string.punctuation)``).
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --- SQuAD ------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop ASCII punctuation, drop the articles
    a/an/the, collapse whitespace (in that order, as the official v1.1/v2.0 script)."""
    text = text.lower().translate(_NO_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1_of_tokens(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of the normalised answers: the harmonic mean of precision and recall of
    the multiset of tokens they share. When either side normalises to no tokens, 1.0 if both do
    and 0.0 otherwise (SQuAD v2.0's rule).

    Written here rather than taken from a library: it is SQuAD's definition in ten lines, and the
    libraries that carry it (HF ``evaluate``'s ``squad`` metric) fetch their metric scripts from the
    hub at run time, which a cluster without hub access cannot do.
    """
    return _f1_of_tokens(normalize_answer(prediction).split(), normalize_answer(reference).split())


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
def rouge_tokenizer():
    """The process's ROUGE tokenizer: ``rouge_score``'s ``DefaultTokenizer(use_stemmer=True)``
    with one change that does not alter a token: Porter stems are remembered (``rouge-score``
    stems every word of every text anew, over half of its time)."""
    from nltk.stem import porter
    from rouge_score import tokenize, tokenizers

    stemmer = SimpleNamespace(stem=functools.lru_cache(maxsize=STEM_CACHE_SIZE)(porter.PorterStemmer().stem))

    class StemCachingTokenizer(tokenizers.Tokenizer):
        """``rouge_score``'s DefaultTokenizer(use_stemmer=True), stems remembered."""

        def tokenize(self, text):
            return tokenize.tokenize(text, stemmer)

    return StemCachingTokenizer()


@functools.lru_cache(maxsize=1)
def rouge_scorer():
    """``RougeScorer(ROUGE_TYPES)`` with :func:`rouge_tokenizer`, made once: the reference the
    fast path (:func:`rouge_of_tokens`) is tested against, and a scorer for callers that want
    ``rouge-score``'s own ``Score`` objects."""
    from rouge_score import rouge_scorer as rs
    return rs.RougeScorer(list(ROUGE_TYPES), tokenizer=rouge_tokenizer())


@functools.lru_cache(maxsize=1)
def _lib() -> SimpleNamespace:
    """What scoring a record needs, made once per process (a Python worker keeps it)."""
    import sacrebleu
    from rapidfuzz.distance import LCSseq
    from rouge_score import scoring

    # sacrebleu.sentence_bleu / sentence_chrf build these with their default arguments on every
    # call; the objects keep no state between sentence_score calls.
    bleu = sacrebleu.BLEU(lowercase=False, tokenize=sacrebleu.BLEU.TOKENIZER_DEFAULT, force=False,
                          smooth_method="exp", smooth_value=None, effective_order=True)
    chrf = sacrebleu.CHRF(char_order=sacrebleu.CHRF.CHAR_ORDER, word_order=sacrebleu.CHRF.WORD_ORDER,
                          beta=sacrebleu.CHRF.BETA, whitespace=False, eps_smoothing=False)
    return SimpleNamespace(tokenize=rouge_tokenizer().tokenize, lcs=LCSseq.similarity,
                           fmeasure=scoring.fmeasure, bleu=bleu.sentence_score, chrf=chrf.sentence_score)


def rouge_of_tokens(pred: list[str], ref: list[str]) -> tuple[float, float, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F of ``rouge_score``-tokenized texts, as ``rouge_score``'s
    ``_score_ngrams`` and ``_score_lcs`` compute them (the LCS length by rapidfuzz: see the
    module docstring)."""
    lib = _lib()
    fmeasure = lib.fmeasure
    n_pred, n_ref = len(pred), len(ref)
    # ROUGE-N: clipped n-gram matches over max(count, 1) on each side
    same = sum((Counter(ref) & Counter(pred)).values())
    r1 = fmeasure(same / max(n_pred, 1), same / max(n_ref, 1))
    same = sum((Counter(zip(ref, ref[1:])) & Counter(zip(pred, pred[1:]))).values())
    r2 = fmeasure(same / max(n_pred - 1, 1), same / max(n_ref - 1, 1))
    if not n_pred or not n_ref:
        return r1, r2, 0.0
    ids: dict[str, int] = {}
    lcs = lib.lcs([ids.setdefault(t, len(ids)) for t in ref], [ids.setdefault(t, len(ids)) for t in pred])
    return r1, r2, fmeasure(lcs / n_pred, lcs / n_ref)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of ``prediction`` against ``reference``."""
    tokenize = _lib().tokenize
    return dict(zip(ROUGE_TYPES, rouge_of_tokens(tokenize(prediction), tokenize(reference))))


def bleu(prediction: str, reference: str) -> float:
    """sacrebleu's sentence BLEU, 0..1 (a perfect match's 100.00000000000004 is 1.0)."""
    return min(1.0, _lib().bleu(prediction, [reference]).score / 100.0)


def chrf(prediction: str, reference: str) -> float:
    """sacrebleu's sentence chrF, 0..1 (clamped like :func:`bleu`)."""
    return min(1.0, _lib().chrf(prediction, [reference]).score / 100.0)


# --- a record, a batch ------------------------------------------------------------------------

def _absence(value: Any, missing: str, empty: str) -> str | None:
    """The reason ``value`` cannot be scored as text, or None when it is a non-blank string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if not isinstance(value, str):
        raise TypeError(f"expected a string or None, got {type(value).__name__}")
    return None if value.strip() else empty


def _metrics(prediction: str, reference: str) -> tuple:
    """The values of :data:`METRICS`, in order, of two non-blank texts: each text tokenized
    once for the three ROUGE types and normalised once for token F1 and exact match."""
    lib = _lib()
    r1, r2, rl = rouge_of_tokens(lib.tokenize(prediction), lib.tokenize(reference))
    pred_norm, ref_norm = normalize_answer(prediction), normalize_answer(reference)
    return (r1, r2, rl,
            min(1.0, lib.bleu(prediction, [reference]).score / 100.0),
            min(1.0, lib.chrf(prediction, [reference]).score / 100.0),
            _f1_of_tokens(pred_norm.split(), ref_norm.split()),
            float(pred_norm == ref_norm),
            length_ratio(prediction, reference))


def _scored(prediction: Any, reference: Any) -> tuple[tuple, str | None]:
    reason = _absence(reference, MISSING_REFERENCE, EMPTY_REFERENCE)
    if reason:
        return (None,) * len(METRICS), reason
    reason = _absence(prediction, MISSING_PREDICTION, EMPTY_PREDICTION)
    if reason:
        return (0.0,) * len(METRICS), reason
    return _metrics(prediction, reference), None


def score(prediction: str | None, reference: str | None) -> dict[str, Any]:
    """Every metric of :data:`METRICS` for one record, and ``reason`` (None when both sides are
    text; see the module docstring for the rest)."""
    values, reason = _scored(prediction, reference)
    out: dict[str, Any] = dict(zip(METRICS, values))
    out["reason"] = reason
    return out


def score_many(predictions: Sequence[str | None], references: Sequence[str | None]) -> dict[str, list]:
    """:func:`score` of aligned predictions and references, as columns: ``{metric: [value per
    record]}`` for every metric of :data:`METRICS`, and ``reason``. ValueError when the lengths
    differ."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    rows = [_scored(pred, ref) for pred, ref in zip(predictions, references)]
    columns: dict[str, list] = {name: [values[i] for values, _ in rows] for i, name in enumerate(METRICS)}
    columns["reason"] = [reason for _, reason in rows]
    return columns
