"""Dolly's prompt format, string for string."""
from dollyflow.core.prompt import (DOLLY_SPECIAL_TOKENS, END_KEY, INSTRUCTION_KEY, INTRO_BLURB, RESPONSE_KEY,
                                   RESPONSE_KEY_NL, format_inference_prompt, format_training_prompt,
                                   prompt_prefix, response_suffix)

INTRO = ("Below is an instruction that describes a task. "
         "Write a response that appropriately completes the request.")


def test_constants_are_dollys():
    assert INTRO_BLURB == INTRO
    assert (INSTRUCTION_KEY, RESPONSE_KEY, END_KEY) == ("### Instruction:", "### Response:", "### End")
    assert RESPONSE_KEY_NL == "### Response:\n"
    assert DOLLY_SPECIAL_TOKENS == ("### End", "### Instruction:", "### Response:\n")


def test_training_prompt_without_context():
    got = format_training_prompt("Name a colour.", "Blue.", "")
    assert got == (INTRO + "\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.\n\n### End")
    assert format_training_prompt("Name a colour.", "Blue.") == got
    assert format_training_prompt("Name a colour.", "Blue.", None) == got


def test_training_prompt_with_context():
    got = format_training_prompt("Summarise.", "Short.", "A long\ntext.")
    assert got == (INTRO + "\n\n### Instruction:\nSummarise.\n\nInput:\nA long\ntext.\n\n"
                   "### Response:\nShort.\n\n### End")


def test_inference_prompt_is_the_training_prefix():
    assert format_inference_prompt("Name a colour.") == (
        INTRO + "\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert format_inference_prompt("Q", "C") == INTRO + "\n\n### Instruction:\nQ\n\nInput:\nC\n\n### Response:\n"
    for ctx in ("", "some context"):
        full = format_training_prompt("Q", "R", ctx)
        assert full == prompt_prefix("Q", ctx) + response_suffix("R")
        assert full.startswith(format_inference_prompt("Q", ctx))
