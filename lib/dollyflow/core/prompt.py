"""Dolly's prompt format, reproduced string for string (engine-free).

Training prompt, sections separated by blank lines (``Input:`` only when there is context)::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    Input:
    {context}

    ### Response:
    {response}

    ### End

The inference prompt is the training prompt cut right after ``### Response:\\n``: the model
generates the response and stops at ``### End``.
"""
from __future__ import annotations

INTRO_BLURB = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "Input:"
RESPONSE_KEY = "### Response:"
END_KEY = "### End"
RESPONSE_KEY_NL = f"{RESPONSE_KEY}\n"

#: Added to the tokenizer as special tokens, in this order (Dolly's order: ids base, base+1, base+2).
DOLLY_SPECIAL_TOKENS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL)


def _has_context(context: str | None) -> bool:
    return bool(context)


def prompt_prefix(instruction: str, context: str | None = None) -> str:
    """Everything up to and including ``### Response:\\n``: the inference prompt.

    Identical to Dolly's generation prompt (``PROMPT_FOR_GENERATION_FORMAT``) and to the
    part of the training prompt that is masked out of the loss. ``context`` is included
    under ``Input:`` only when it is non-empty.
    """
    if _has_context(context):
        return (f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n"
                f"{INPUT_KEY}\n{context}\n\n{RESPONSE_KEY_NL}")
    return f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n{RESPONSE_KEY_NL}"


def response_suffix(response: str) -> str:
    """The part of the training prompt that counts in the loss: the response and ``### End``."""
    return f"{response}\n\n{END_KEY}"


def format_inference_prompt(instruction: str, context: str | None = None) -> str:
    """The prompt given to the model at generation time (ends with ``### Response:\\n``)."""
    return prompt_prefix(instruction, context)


def format_training_prompt(instruction: str, response: str, context: str | None = None) -> str:
    """Dolly's full training text for one record."""
    return prompt_prefix(instruction, context) + response_suffix(response)
