"""Which metric is the headline of each of Dolly's categories, and why (engine-free).

- closed_qa, information_extraction, classification: the answer is a short span or a label taken
  from the context or the instruction, so SQuAD's token F1 (with exact match beside it) says
  whether it was found.
- summarization: many wordings of one summary are right; ROUGE-L rewards covering the
  reference's content in order without asking for its exact words.
- open_qa, general_qa, brainstorming, creative_writing: many good answers share few words with
  the one reference, so overlap metrics mostly measure wording; they are shown, but the headline
  is the judge's score (wins plus half the ties against the other answer, both orders). Without a
  judge the headline falls back to ROUGE-L, and the text says how little that means.

A category that is not one of Dolly's gets ROUGE-L, as a general overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dollyflow.config import DOLLY_CATEGORIES

TOKEN_F1 = "token_f1"
ROUGE_L = "rougeL"
#: The judge's headline: win rate with ties counted half (:class:`dollyflow.core.evaluation.judge.WinRates`).
JUDGE = "judge_score"

#: What each metric column is called in a report.
LABELS = {
    "token_f1": "token F1", "exact_match": "exact match", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L", "bleu": "BLEU", "chrf": "chrF", "length_ratio": "length ratio",
    JUDGE: "judge score (wins + ½ ties)",
}
#: Reference metrics shown beside every headline.
REFERENCE_METRICS = ("token_f1", "exact_match", "rougeL", "rouge1", "rouge2", "bleu", "chrf", "length_ratio")

SPAN_CATEGORIES = ("closed_qa", "information_extraction", "classification")
SUMMARY_CATEGORIES = ("summarization",)
JUDGED_CATEGORIES = ("open_qa", "general_qa", "brainstorming", "creative_writing")


@dataclass(frozen=True)
class Headline:
    category: str
    metric: str              # the column the report's bars show
    companions: tuple        # metrics shown beside it first
    why: str


_SPAN_WHY = ("the answer is a short span or a label from the context or the instruction, so token F1 "
             "(shared words after SQuAD normalisation) and exact match say whether it was found")
_SUMMARY_WHY = ("many wordings of a summary are right; ROUGE-L rewards covering the reference's content "
                "in order without asking for its exact words")
_JUDGED_WHY = ("many good answers share few words with the one reference, so overlap metrics mostly "
               "measure wording; the judge compares the two answers directly (both orders, to cancel "
               "position bias)")
_UNJUDGED_WHY = (_JUDGED_WHY.split(";")[0] + "; no judge was run, so ROUGE-L stands in, and a difference "
                 "in it says little about quality")
_OTHER_WHY = "not one of Dolly's categories: ROUGE-L as a general overlap with the reference"


def headline(category: str | None, *, judged: bool = True) -> Headline:
    """The headline of ``category``; ``judged`` says whether a judge ran (without one, the judged
    categories fall back to ROUGE-L)."""
    cat = category or ""
    if cat in SPAN_CATEGORIES:
        return Headline(cat, TOKEN_F1, ("exact_match",), _SPAN_WHY)
    if cat in SUMMARY_CATEGORIES:
        return Headline(cat, ROUGE_L, ("rouge1", "rouge2"), _SUMMARY_WHY)
    if cat in JUDGED_CATEGORIES:
        if judged:
            return Headline(cat, JUDGE, ("rougeL", "token_f1"), _JUDGED_WHY)
        return Headline(cat, ROUGE_L, ("token_f1",), _UNJUDGED_WHY)
    return Headline(cat, ROUGE_L, ("token_f1",), _OTHER_WHY)


def headline_metric(category: str | None, *, judged: bool = True) -> str:
    """The headline metric's column name for ``category``."""
    return headline(category, judged=judged).metric


def explain(categories: Iterable[str] | None = None, *, judged: bool = True) -> str:
    """The report's paragraph on headline metrics (Markdown): one line per category
    (``categories`` default: Dolly's eight, in their order), then a note on the scales."""
    cats = list(DOLLY_CATEGORIES if categories is None else categories)
    lines = ["Each category is headlined by the metric that fits its kind of answer; every reference "
             "metric is shown beside it.", ""]
    for cat in cats:
        h = headline(cat, judged=judged)
        shown = " and ".join(LABELS.get(m, m) for m in h.companions)
        lines.append(f"- **{cat or '(no category)'}**: {LABELS.get(h.metric, h.metric)}"
                     f"{f', beside {shown}' if shown else ''}. Why: {h.why}.")
    lines += ["", "All metrics are on a 0–1 scale (BLEU and chrF divided by 100); length ratio is "
              "prediction words over reference words. Intervals are 95% percentile bootstrap "
              "intervals of the mean."]
    return "\n".join(lines)
