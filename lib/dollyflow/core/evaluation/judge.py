"""Pairwise judging by a language model: the rubric prompt, strict parsing of its verdict, the two
orders combined, and win rates with bootstrap intervals (engine-free; the model runs elsewhere,
through the project's batched generator).

For every row the judge sees the task (instruction, its context, the reference answer when there
is one) and two answers labelled A and B, twice: :func:`judge_prompts` gives both orders. The
convention throughout: ``answer_1`` is the baseline (model A of a comparison) and ``answer_2``
the candidate (model B), so a win is a win for B, as in the paired bootstrap of ``B - A``.

- :func:`parse_verdict` is strict: ``"A"``, ``"B"``, ``"tie"`` (any case, on the first non-empty
  line, with quotes, markdown emphasis, brackets or a trailing full stop around it, optionally after
  ``Answer:``/``Verdict:``), anything else is ``None``: counted as unparseable, never guessed.
- :func:`combine` turns the two orders into the candidate's :data:`WIN`, :data:`TIE` or
  :data:`LOSS`: the orders must agree, otherwise it is a tie (a judge that always picks the first
  position gives ties, not wins); a ``None`` in either order gives :data:`UNPARSEABLE`.
- :func:`win_rates`: shares of wins, ties and losses among the parseable rows, and the judge
  score (wins + ½ ties), each with a percentile bootstrap interval; unparseable rows are counted
  beside them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from dollyflow.core.evaluation.bootstrap import (DEFAULT_LEVEL, DEFAULT_RESAMPLES, OVERALL, Interval,
                                                 percentile_bounds, resample_means, rng_for)

A, B, TIE_VERDICT = "A", "B", "tie"
WIN, TIE, LOSS, UNPARSEABLE = "win", "tie", "loss", "unparseable"
OUTCOMES = (WIN, TIE, LOSS, UNPARSEABLE)
NO_ANSWER = "(no answer)"

RUBRIC = (
    "You are an impartial judge. Two answers, A and B, were written for the task below. Decide which "
    "answer is better. A better answer does what the instruction asks, is correct and consistent with "
    "the context and the reference answer when they are given, is complete without padding or "
    "repetition, and is clear. Do not prefer an answer for its length or for its position. If neither "
    "is better, say tie."
)
QUESTION = 'Which answer is better? Reply with exactly one of: "A", "B" or "tie".'


class JudgePrompt(NamedTuple):
    """One order's prompt, as the generator takes it: ``instruction`` holds the rubric, the task
    and both answers; ``context`` the task's context and reference answer (None when it has
    neither), which is what the generator trims from the left when a prompt is too long, so
    the answers are never cut. ``candidate`` is the label ("A" or "B") the candidate holds."""
    instruction: str
    context: str | None
    candidate: str


def _text(value) -> str:
    return value.strip() if isinstance(value, str) and value.strip() else NO_ANSWER


def _prompt(task: str, first: str, second: str, context: str | None, candidate: str) -> JudgePrompt:
    instruction = (f"{RUBRIC}\n\nTask:\n{task}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n{QUESTION}")
    return JudgePrompt(instruction, context, candidate)


def judge_prompts(row: Mapping, answer_1: str | None, answer_2: str | None) -> tuple[JudgePrompt, JudgePrompt]:
    """Both orders for one row (``row``: ``instruction``, optional ``context`` and ``response``,
    the reference): first ``answer_1`` as A and ``answer_2`` as B, then swapped. A missing or
    blank answer is shown as :data:`NO_ANSWER`."""
    task = _text(row.get("instruction"))
    parts = []
    if isinstance(row.get("context"), str) and row["context"].strip():
        parts.append(f"Context of the task:\n{row['context'].strip()}")
    if isinstance(row.get("response"), str) and row["response"].strip():
        parts.append(f"Reference answer:\n{row['response'].strip()}")
    context = "\n\n".join(parts) or None
    one, two = _text(answer_1), _text(answer_2)
    return _prompt(task, one, two, context, B), _prompt(task, two, one, context, A)


_PREFIX = re.compile(r"^(?:(?:final|better)\s+)?(?:answer|verdict|judgement|judgment)\s*(?:is)?\s*[:\-]?\s*",
                     re.IGNORECASE)
_WRAPPING = " \t\"'`*_()[]{}<>"


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` when the first non-empty line of ``text`` is exactly one of
    them (see the module docstring for what may surround it); None otherwise."""
    if not isinstance(text, str):
        return None
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    for _ in range(2):   # "**Answer: A**", "Answer: **A**."
        line = line.strip(_WRAPPING).rstrip(".!").strip(_WRAPPING)
        line = _PREFIX.sub("", line, count=1)
    word = line.strip(_WRAPPING).rstrip(".!").strip(_WRAPPING)
    if word in (A, B):
        return word
    if word.upper() in (A, B) and len(word) == 1:
        return word.upper()
    return TIE_VERDICT if word.lower() == TIE_VERDICT else None


def _for_candidate(verdict: str, candidate: str) -> str:
    if verdict == TIE_VERDICT:
        return TIE
    return WIN if verdict == candidate else LOSS


def combine(first: str | None, second: str | None) -> str:
    """The candidate's outcome from the parsed verdicts of the first order (candidate = B) and
    the second (candidate = A)."""
    for v in (first, second):
        if v not in (A, B, TIE_VERDICT, None):
            raise ValueError(f"not a parsed verdict: {v!r} (use parse_verdict)")
    if first is None or second is None:
        return UNPARSEABLE
    one, two = _for_candidate(first, B), _for_candidate(second, A)
    return one if one == two else TIE


@dataclass(frozen=True)
class WinRates:
    """The candidate's outcomes over ``n`` parseable rows (``unparseable`` more were judged);
    ``score`` is wins + ½ ties. Each rate is a share of the parseable rows."""
    n: int
    unparseable: int
    win: Interval
    tie: Interval
    loss: Interval
    score: Interval

    @property
    def total(self) -> int:
        return self.n + self.unparseable


def win_rates(verdicts: Sequence[str | None], *, seed: int, resamples: int = DEFAULT_RESAMPLES,
              level: float = DEFAULT_LEVEL, label: str = OVERALL) -> WinRates:
    """Win/tie/loss rates and the judge score of :func:`combine`'s outcomes (``None`` counts as
    unparseable), with percentile bootstrap intervals drawn from the same resamples."""
    bad = [v for v in verdicts if v is not None and v not in OUTCOMES]
    if bad:
        raise ValueError(f"not an outcome: {bad[0]!r} (expected one of {OUTCOMES})")
    kept = [v for v in verdicts if v is not None and v != UNPARSEABLE]
    unparseable = len(verdicts) - len(kept)
    if not kept:
        nan = Interval(float("nan"), float("nan"), float("nan"), 0, unparseable)
        return WinRates(0, unparseable, nan, nan, nan, nan)
    outcome = np.array(kept, dtype=object)
    cols = np.stack([outcome == WIN, outcome == TIE, outcome == LOSS], axis=1).astype(np.float64)
    cols = np.column_stack([cols, cols[:, 0] + 0.5 * cols[:, 1]])
    means = resample_means(cols, rng_for(seed, label), resamples)
    intervals = [Interval(float(cols[:, j].mean()), *percentile_bounds(means[:, j], level), len(kept),
                          unparseable) for j in range(cols.shape[1])]
    return WinRates(len(kept), unparseable, *intervals)
