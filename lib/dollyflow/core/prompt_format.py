"""The two prompt formats (``prompt.format``), one interface for tokenize, train and generation
(engine-free: no Spark, no torch).

- ``dolly`` (:class:`DollyFormat`, the default): Dolly's own prompt (:mod:`dollyflow.core.prompt`) with
  its three added special tokens; stops at ``### End``.
- ``chat_template`` (:class:`ChatFormat`): the tokenizer's own chat template renders the
  instruction (and the context, under ``Input:``) as the user turn, the response as the
  assistant turn, after an optional system turn (``prompt.system``). No token is added to the
  tokenizer. The loss counts the assistant's tokens and its end-of-turn token only: the
  conversation is rendered twice, the prompt alone (``add_generation_prompt=True``, what the
  model sees at generation time) and whole; the whole text must start with the prompt's (else
  the record is dropped, ``template_mismatch``); the ids are the prompt's ids (exactly those
  generation feeds the model) followed by those of the rest, encoded apart (a byte-level BPE
  could merge tokens across the boundary), and the ids after the end-of-turn token (a
  template's trailing newline) are cut. Most templates lack ``{% generation %}``
  markers, so ``return_assistant_tokens_mask`` is not used. The end-of-turn token is the
  first token the template writes after the assistant's text (``<|im_end|>``, ``<|eot_id|>``,
  ``</s>``); it must be a single special token, else generation could not stop at it and the
  format is refused. Generation stops there and at eos.

Texts are rendered with transformers' jinja renderer and encoded without the tokenizer's own
special tokens (the template writes bos itself), as ``apply_chat_template`` does; the Rust
backend encodes them in Spark workers, so a :class:`ChatFormat` travels as a plain dict
(:meth:`ChatFormat.to_dict`).

The format a model was trained with is recorded in the shards' manifest (``prompt``) and the
model directory's provenance (``prompt``), and read back from there (:func:`format_from_info`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from dollyflow.core.prompt import DOLLY_SPECIAL_TOKENS, END_KEY, format_inference_prompt
from dollyflow.core.tokens import (DROP_EMPTY_INSTRUCTION, DROP_EMPTY_RESPONSE, DROP_TOO_LONG, EncodedBatch,
                                   encode_records as dolly_encode_records, ensure_pad_token, load_tokenizer)

DOLLY = "dolly"
CHAT_TEMPLATE = "chat_template"
FORMATS = (DOLLY, CHAT_TEMPLATE)

DROP_TEMPLATE_MISMATCH = "template_mismatch"

#: The response used to find what the template writes after an assistant message.
_MARK = "dollyflow-response-marker"


def user_text(instruction: str, context: str | None) -> str:
    """The user turn: the instruction, and the context under ``Input:`` (as Dolly's prompt has it)
    when it is non-empty."""
    return f"{instruction}\n\nInput:\n{context}" if context else instruction


class DollyFormat:
    """Dolly's prompt and special tokens (the default)."""
    name = DOLLY
    add_special_tokens = True

    def prompt_text(self, instruction: str, context: str | None = None) -> str:
        return format_inference_prompt(instruction, context)

    def stop_ids(self, tokenizer) -> list[int]:
        ids = [tokenizer.convert_tokens_to_ids(END_KEY), tokenizer.eos_token_id]
        return sorted({int(i) for i in ids if i is not None})

    def to_dict(self) -> dict:
        return {"format": DOLLY}


@dataclass(frozen=True)
class ChatFormat:
    """A tokenizer's chat template with an optional system prompt (see the module doc).
    ``tokens``: the special tokens the template may name (``bos_token``, ``eos_token``, ...)."""
    template: str
    system: str = ""
    tokens: dict = field(default_factory=dict)
    name = CHAT_TEMPLATE
    add_special_tokens = False

    @classmethod
    def from_tokenizer(cls, tokenizer, system: str = "", where: str = "the tokenizer") -> "ChatFormat":
        """ValueError naming ``prompt.format`` when the tokenizer has no chat template or the
        template's end of turn is not a special token."""
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise ValueError(f"prompt.format=chat_template: {where} has no chat template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja); use prompt.format=dolly or a tokenizer "
                             "that has one (an instruct/chat model's)")
        tokens = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        fmt = cls(str(template), system or "", tokens)
        fmt.end_of_turn_id(tokenizer)   # fails now rather than at generation
        if system and system not in fmt.prompt_text("Q"):
            raise ValueError(f"prompt.system: the chat template of {where} writes no system turn (it dropped the "
                             "system prompt); leave prompt.system empty for it")
        return fmt

    # -- rendering ----------------------------------------------------------------------------

    def messages(self, instruction: str, context: str | None, response: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": user_text(instruction, context)})
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def _render(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=conversations, chat_template=self.template,
                                            add_generation_prompt=add_generation_prompt, **self.tokens)
        return rendered

    def prompt_texts(self, instructions: Sequence[str], contexts: Sequence[str | None]) -> list[str]:
        """The generation prompts (user turn, then the assistant header)."""
        if not instructions:
            return []
        return self._render([self.messages(i, c) for i, c in zip(instructions, contexts)], True)

    def prompt_text(self, instruction: str, context: str | None = None) -> str:
        return self.prompt_texts([instruction], [context])[0]

    def full_texts(self, instructions, contexts, responses) -> list[str]:
        if not instructions:
            return []
        return self._render([self.messages(i, c, r) for i, c, r in zip(instructions, contexts, responses)], False)

    # -- tokens -------------------------------------------------------------------------------

    def end_tail(self) -> str:
        """What the template writes after an assistant message's text."""
        full = self.full_texts(["Q"], [None], [_MARK])[0]
        at = full.rfind(_MARK)
        if at < 0:
            raise ValueError("prompt.format=chat_template: the chat template does not write the assistant's "
                             "message as it is")
        return full[at + len(_MARK):]

    def end_of_turn_id(self, tokenizer_or_backend) -> int:
        """The id of the first token after the assistant's text: a special token of the tokenizer."""
        tail = self.end_tail()
        backend = getattr(tokenizer_or_backend, "backend_tokenizer", tokenizer_or_backend)
        ids = backend.encode(tail, add_special_tokens=False).ids if tail else []
        special = {int(i) for i, t in backend.get_added_tokens_decoder().items() if t.special}
        if not ids or ids[0] not in special:
            raise ValueError(f"prompt.format=chat_template: the chat template ends an assistant turn with "
                             f"{tail[:20]!r}, which does not start with a special token: generation could not "
                             "stop at the end of a turn")
        return int(ids[0])

    def stop_ids(self, tokenizer) -> list[int]:
        ids = {self.end_of_turn_id(tokenizer)}
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        return sorted(ids)

    def to_dict(self) -> dict:
        return {"format": CHAT_TEMPLATE, "system": self.system, "template": self.template, "tokens": dict(self.tokens)}


def provenance(fmt) -> dict:
    """What a manifest or model directory records of the format (the template itself lives in the
    saved tokenizer)."""
    return {"format": fmt.name, "system": getattr(fmt, "system", "")}


def from_dict(d: dict | None):
    """:meth:`to_dict`'s inverse (None or ``dolly``: :class:`DollyFormat`)."""
    if not d or d.get("format", DOLLY) == DOLLY:
        return DollyFormat()
    return ChatFormat(d["template"], d.get("system") or "", dict(d.get("tokens") or {}))


def has_dolly_tokens(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in DOLLY_SPECIAL_TOKENS)


def for_tokenizer(format_name: str, tokenizer, system: str = "", where: str = "the tokenizer"):
    """The format ``format_name`` (``prompt.format``) for ``tokenizer``."""
    if format_name == DOLLY:
        return DollyFormat()
    if format_name == CHAT_TEMPLATE:
        return ChatFormat.from_tokenizer(tokenizer, system, where)
    raise ValueError(f"prompt.format must be one of {', '.join(FORMATS)}, got {format_name!r}")


def recorded(info: dict | None) -> dict:
    """``{"format", "system"}`` recorded in a manifest or provenance (``prompt``; a manifest older
    than it has only ``prompt_format``, and older still nothing: ``dolly``)."""
    info = info or {}
    rec = info.get("prompt")
    if isinstance(rec, dict) and rec.get("format"):
        return {"format": rec["format"], "system": rec.get("system") or ""}
    return {"format": info.get("prompt_format") or DOLLY, "system": ""}


def load_prompt_tokenizer(path: str, info: dict | None):
    """(tokenizer, format) of a saved tokenizer directory (shards', model directory's) for the format
    recorded in ``info`` (:func:`recorded`): Dolly's tokens are added (a no-op when saved with them) only
    in the ``dolly`` format; pad = eos when there is no pad token."""
    rec = recorded(info)
    tok = load_tokenizer(path, dolly_tokens=rec["format"] == DOLLY)
    ensure_pad_token(tok)
    return tok, for_tokenizer(rec["format"], tok, rec["system"], where=f"the tokenizer in {path}")


def prompt_tokenizer(name_or_path: str, prompt_format: str = DOLLY, system: str = ""):
    """(tokenizer, prompt format) for ``prompt.format``: ``dolly`` adds Dolly's special tokens;
    ``chat_template`` adds nothing, sets pad = eos when there is no pad token and needs the
    tokenizer's chat template (ValueError naming prompt.format otherwise)."""
    tok = load_tokenizer(name_or_path, dolly_tokens=prompt_format == DOLLY)
    if prompt_format != DOLLY:
        ensure_pad_token(tok)
    return tok, for_tokenizer(prompt_format, tok, system, where=f"the tokenizer {name_or_path!r}")


def format_from_info(info: dict | None, tokenizer, where: str = "the model directory"):
    """The format recorded in a manifest's or provenance's ``prompt`` (or, for a legacy manifest,
    ``prompt_format``) for ``tokenizer``. Nothing recorded (a model not trained here): ``dolly``
    when the tokenizer has Dolly's tokens, else its chat template when it has one, else
    ``dolly`` (whose checks then name what is missing)."""
    info = info or {}
    rec = info.get("prompt")
    if isinstance(rec, dict) and rec.get("format"):
        return for_tokenizer(rec["format"], tokenizer, rec.get("system") or "", where)
    if info.get("prompt_format") in FORMATS:      # a manifest written before ``prompt``
        return for_tokenizer(info["prompt_format"], tokenizer, "", where)
    if not has_dolly_tokens(tokenizer) and getattr(tokenizer, "chat_template", None):
        return ChatFormat.from_tokenizer(tokenizer, "", where)
    return DollyFormat()


# ---------------------------------------------------------------------------------------------
# training records


def encode_records(backend, fmt, instructions: Sequence[str | None], contexts: Sequence[str | None],
                   responses: Sequence[str | None], max_length: int) -> EncodedBatch:
    """Training records in the format ``fmt`` (a :class:`DollyFormat`: :func:`dollyflow.core.tokens.encode_records`).
    Chat format: per kept record the conversation's ids ending with the end-of-turn token and the
    index of the first assistant token; blank instructions/responses, ``too_long`` and
    ``template_mismatch`` records are dropped with their reason."""
    if not isinstance(fmt, ChatFormat):
        return dolly_encode_records(backend, instructions, contexts, responses, max_length)
    n = len(instructions)
    if not (len(contexts) == len(responses) == n):
        raise ValueError("instructions, contexts and responses must have the same length")
    reasons: list = [None] * n
    keep: list[int] = []
    for i in range(n):
        if instructions[i] is None or not instructions[i].strip():
            reasons[i] = DROP_EMPTY_INSTRUCTION
        elif responses[i] is None or not responses[i].strip():
            reasons[i] = DROP_EMPTY_RESPONSE
        else:
            keep.append(i)
    out_ids: list = [None] * n
    starts: list = [None] * n
    lengths: list = [None] * n
    if keep:
        ins = [instructions[i] for i in keep]
        ctx = [contexts[i] for i in keep]
        prompts = fmt.prompt_texts(ins, ctx)
        fulls = fmt.full_texts(ins, ctx, [responses[i] for i in keep])
        eot = fmt.end_of_turn_id(backend)
        # the prompt's ids exactly as generation sees them, then the rest of the conversation: a
        # byte-level BPE may merge across the boundary ("\n\n" + "Hello") when encoded whole
        good = [k for k, (p, f) in enumerate(zip(prompts, fulls)) if f.startswith(p) and len(f) > len(p)]
        enc_p = backend.encode_batch([prompts[k] for k in good], add_special_tokens=False)
        enc_s = backend.encode_batch([fulls[k][len(prompts[k]):] for k in good], add_special_tokens=False)
        for k, i in enumerate(keep):
            if k not in good:
                reasons[i] = DROP_TEMPLATE_MISMATCH
        for k, p, r in zip(good, enc_p, enc_s):
            i, p, r = keep[k], p.ids, r.ids
            ends = [j for j, t in enumerate(r) if t == eot]
            if not ends or ends[-1] == 0:
                reasons[i] = DROP_TEMPLATE_MISMATCH
                continue
            ids = p + r[:ends[-1] + 1]
            lengths[i] = len(ids)
            if len(ids) > max_length:
                reasons[i] = DROP_TOO_LONG
                continue
            out_ids[i], starts[i] = ids, len(p)
    out = EncodedBatch()
    out.input_ids, out.response_start, out.length, out.drop_reason = out_ids, starts, lengths, reasons
    return out
