"""The pairwise judge: prompts in both orders, strict parsing, position bias cancelled, win rates;
with scripted judges standing in for the model."""
import re

import pytest

from dollyflow.core.evaluation import judge as j

ROW = {"instruction": "What is the capital of France?", "context": "France is a country in Europe.",
       "response": "Paris is the capital of France."}


def test_prompts_in_both_orders():
    first, second = j.judge_prompts(ROW, "Lyon.", "It is Paris.")
    assert first.instruction.startswith(j.RUBRIC) and first.instruction.endswith(j.QUESTION)
    assert "Task:\nWhat is the capital of France?" in first.instruction
    assert "Answer A:\nLyon.\n\nAnswer B:\nIt is Paris." in first.instruction and first.candidate == "B"
    assert "Answer A:\nIt is Paris.\n\nAnswer B:\nLyon." in second.instruction and second.candidate == "A"
    assert first.context == second.context == ("Context of the task:\nFrance is a country in Europe.\n\n"
                                               "Reference answer:\nParis is the capital of France.")
    # the answers sit in the instruction: a generator trimming a long context never cuts them
    assert "Lyon" not in first.context


def test_prompts_without_context_or_reference_and_with_a_missing_answer():
    first, second = j.judge_prompts({"instruction": "Name a fruit.", "context": "", "response": None}, None, "  ")
    assert first.context is None and second.context is None
    assert f"Answer A:\n{j.NO_ANSWER}\n\nAnswer B:\n{j.NO_ANSWER}" in first.instruction
    only_ref, _ = j.judge_prompts({"instruction": "Name a fruit.", "response": "Apple"}, "pear", "fig")
    assert only_ref.context == "Reference answer:\nApple"


@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), ("B", "B"), ("tie", "tie"),                                   # good
    (" b.\n", "B"), ("a", "A"), ("Tie", "tie"), ("TIE!", "tie"), ("**A**", "A"), ('"tie"', "tie"),
    ("(B)", "B"), ("Answer: B", "B"), ("answer A", "A"), ("Verdict: tie.", "tie"), ("**Answer: A**", "A"),
    ("Answer: **B**.", "B"), ("Better answer: A", "A"), ("\n\n  A\n\nA is more complete.", "A"),  # messy
    ("", None), (None, None), ("   \n", None), ("Both", None), ("A or B", None), ("AB", None),  # garbage
    ("A and B are equally good", None), ("I think A", None), ("B is better", None), ("C", None),
    ("The answer is B", None), ("tied", None), (",.,.,.,.", None), ("### End", None),
])
def test_parse_verdict(text, verdict):
    assert j.parse_verdict(text) == verdict


@pytest.mark.parametrize("first, second, outcome", [
    ("B", "A", j.WIN), ("A", "B", j.LOSS), ("tie", "tie", j.TIE),
    ("A", "A", j.TIE), ("B", "B", j.TIE),                   # position bias: the orders disagree
    ("B", "tie", j.TIE), ("tie", "B", j.TIE),
    (None, "A", j.UNPARSEABLE), ("B", None, j.UNPARSEABLE), (None, None, j.UNPARSEABLE),
])
def test_combine(first, second, outcome):
    assert j.combine(first, second) == outcome


def test_combine_wants_parsed_verdicts():
    with pytest.raises(ValueError, match="parse_verdict"):
        j.combine("Answer: A", "B")


# --- scripted judges -------------------------------------------------------------------------------

def _answers(prompt):
    found = re.search(r"Answer A:\n(.*)\n\nAnswer B:\n(.*)\n\n" + re.escape(j.QUESTION), prompt.instruction, re.S)
    return found.group(1), found.group(2)


def prefers_longer(prompt):
    a, b = _answers(prompt)
    return "tie" if len(a) == len(b) else ("Answer: A." if len(a) > len(b) else "**B**")


def always_first(prompt):
    return "A"


def rambles(prompt):
    return "Both answers have merits, it depends."


def run(judge_fn, pairs):
    outcomes = []
    for baseline, candidate in pairs:
        first, second = j.judge_prompts(ROW, baseline, candidate)
        outcomes.append(j.combine(j.parse_verdict(judge_fn(first)), j.parse_verdict(judge_fn(second))))
    return outcomes


PAIRS = [("Paris.", "The capital is Paris."), ("Paris is the capital.", "Paris"), ("Lyon", "Nice")]


def test_a_consistent_judge_decides():
    assert run(prefers_longer, PAIRS) == [j.WIN, j.LOSS, j.TIE]


def test_position_bias_cancels_to_ties():
    assert run(always_first, PAIRS) == [j.TIE] * 3


def test_garbage_is_counted_unparseable():
    outcomes = run(rambles, PAIRS)
    assert outcomes == [j.UNPARSEABLE] * 3
    rates = j.win_rates(outcomes, seed=0)
    assert rates.n == 0 and rates.unparseable == 3 and rates.total == 3


# --- win rates -------------------------------------------------------------------------------------

def test_win_rates_by_hand():
    verdicts = [j.WIN] * 6 + [j.TIE] * 2 + [j.LOSS] * 2 + [j.UNPARSEABLE] * 2 + [None]
    rates = j.win_rates(verdicts, seed=3, resamples=500)
    assert rates.n == 10 and rates.unparseable == 3 and rates.total == 13
    # shares of the 10 parseable: 6/10 wins, 2/10 ties, 2/10 losses; score 0.6 + 0.2 / 2 = 0.7
    assert (rates.win.mean, rates.tie.mean, rates.loss.mean) == pytest.approx((0.6, 0.2, 0.2))
    assert rates.score.mean == pytest.approx(0.7)
    for iv in (rates.win, rates.tie, rates.loss, rates.score):
        assert iv.low <= iv.mean <= iv.high and iv.n == 10
    assert j.win_rates(verdicts, seed=3, resamples=500) == rates
    assert j.win_rates(verdicts, seed=4, resamples=500) != rates


def test_win_rates_rejects_what_is_not_an_outcome():
    with pytest.raises(ValueError, match="not an outcome"):
        j.win_rates(["A", "win"], seed=0)
