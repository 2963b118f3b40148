"""Quality heuristics on one record, each with its threshold from ``filter:`` and its reason:

- ``empty_response``: fewer than ``min_response_words`` words in the response (categories in
  ``short_answer_categories``, whose one-word answers are normal, are exempt unless the response
  has no word at all);
- ``repeats_instruction`` / ``repeats_context``: the response equals the instruction / the context
  after normalisation (NFC, case-fold, whitespace collapsed);
- ``repetition``: Gopher's repetition rules (Rae et al. 2021, table A1) on responses of at least
  ``repetition_min_words`` words, computed with datatrove's own functions (``find_duplicates``,
  ``find_all_duplicate``, ``get_n_grams``; a top n-gram counts only when it repeats, where
  datatrove's ``find_top_duplicate`` also counts one seen once); the detail names the rule
  (``dup_line_frac``, ``top_2_gram``, ``duplicated_5_n_grams``, ...). Words are split with a
  regex rather than datatrove's ``split_into_words``, whose English tokenizer loads spaCy on first use;
- ``non_alpha``: Gopher's rule that at least ``min_alpha_words`` of the words hold a letter, on
  responses of at least ``alpha_min_words`` words (a year or a number alone is an answer); list
  markers (``1.``, ``-``, ``•``) are not words;
- ``length_outlier``: the response's log word count lies more than ``length_z`` robust deviations
  (1.4826 x MAD) from its category's median, in categories with at least ``length_min_records``
  records (the statistics come from the whole table: :func:`length_stats` over a sample of counts).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from dollyflow.core.text import normalize

_WORD = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)
_LINES = re.compile("\n+")
_PARAS = re.compile(r"\n{2,}")
#: list markers ("1.", "2)", "-", "*", "•") are not words for the non_alpha rule
_MARKER = re.compile(r"^(?:\d{1,3}[.)]|[-*•–·])$")


def words_of(text: str | None) -> list[str]:
    return _WORD.findall(text or "")


@dataclass(frozen=True)
class QualityRules:
    min_response_words: int
    short_answer_categories: tuple[str, ...]
    repetition_min_words: int
    dup_line_frac: float
    top_ngram_frac: float
    dup_ngram_frac: float
    min_alpha_words: float
    alpha_min_words: int
    length_z: float
    length_min_records: int

    @classmethod
    def from_config(cls, f) -> "QualityRules":
        return cls(int(f.min_response_words), tuple(f.short_answer_categories), int(f.repetition_min_words),
                   float(f.dup_line_frac), float(f.top_ngram_frac), float(f.dup_ngram_frac),
                   float(f.min_alpha_words), int(f.alpha_min_words), float(f.length_z), int(f.length_min_records))


def repetition(text: str, words: list[str], r: QualityRules) -> str | None:
    """The first Gopher repetition rule ``text`` breaks (datatrove's name for it), or None."""
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_duplicates, get_n_grams
    chars = len(text)
    paragraphs = _PARAS.split(text.strip())
    dup, dup_chars = find_duplicates(paragraphs)
    if dup / len(paragraphs) > r.dup_line_frac:
        return "dup_para_frac"
    lines = _LINES.split(text)
    dup, dup_chars = find_duplicates(lines)
    if dup / len(lines) > r.dup_line_frac:
        return "dup_line_frac"
    for k, n in enumerate((2, 3, 4)):
        grams = get_n_grams(words, n)
        if not grams:
            continue
        top, count = Counter(grams).most_common(1)[0]
        # datatrove's find_top_duplicate counts an n-gram seen once too, which on a short text alone
        # exceeds the share: only a repeated n-gram is a top duplicate here
        if count > 1 and len(top) * count / chars > r.top_ngram_frac - 0.02 * k:
            return f"top_{n}_gram"
    for k, n in enumerate(range(5, 11)):
        if find_all_duplicate(words, n) / chars > r.dup_ngram_frac - 0.01 * k:
            return f"duplicated_{n}_n_grams"
    return None


def check(instruction: str, context: str, response: str, category: str, r: QualityRules,
          stats: dict | None = None) -> tuple[str, str] | None:
    """(reason, detail) of the first rule the record breaks, or None. ``stats``: category ->
    (median, robust deviation) of log word counts (:func:`length_stats`)."""
    words = words_of(response)
    n = len(words)
    if n == 0 or (n < r.min_response_words and category not in r.short_answer_categories):
        return "empty_response", f"{n} word(s) in the response (min_response_words {r.min_response_words})"
    norm = normalize(response)
    if norm == normalize(instruction):
        return "repeats_instruction", "the response is the instruction, verbatim"
    if context and norm == normalize(context):
        return "repeats_context", "the response is the context, verbatim"
    if n >= r.repetition_min_words:
        rule = repetition(response, words, r)
        if rule:
            return "repetition", f"Gopher rule {rule} over {n} words"
    tokens = [w for w in response.split() if not _MARKER.match(w)]
    if len(tokens) >= r.alpha_min_words:
        alpha = sum(any(c.isalpha() for c in w) for w in tokens) / len(tokens)
        if alpha < r.min_alpha_words:
            return "non_alpha", f"{alpha:.2f} of the words hold a letter (min_alpha_words {r.min_alpha_words})"
    st = (stats or {}).get(category)
    if st is not None:
        median, dev = st
        z = (math.log(n) - median) / dev
        if abs(z) > r.length_z:
            return "length_outlier", (f"{n} words: {z:+.1f} robust deviations from {category}'s median "
                                      f"{math.exp(median):.0f} words (length_z {r.length_z})")
    return None


def length_stats(per_category: dict[str, tuple[int, float, float]], min_records: int) -> dict:
    """category -> (median, robust deviation) of log word counts from (records, median, MAD) per
    category; categories with fewer than ``min_records`` records, or no spread, are left out."""
    out = {}
    for cat, (count, median, mad) in per_category.items():
        if count >= min_records and mad and mad > 0:
            out[cat] = (float(median), 1.4826 * float(mad))
    return out
