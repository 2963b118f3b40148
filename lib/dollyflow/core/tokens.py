"""Tokenizer loading, Dolly special tokens and batched record encoding (engine-free).

Two views of one tokenizer are used:

- the Hugging Face tokenizer (:func:`load_tokenizer`), saved next to the shards with
  :func:`save_tokenizer` so that training and inference load exactly the same one;
- its Rust backend (:class:`tokenizers.Tokenizer`), rebuilt from the saved ``tokenizer.json``
  text inside Spark workers (:func:`backend_from_json`, cached per process) and used by
  :func:`encode_records` for fast batched encoding.

Labels follow Dolly's collator: everything up to and including ``### Response:\\n`` is ignored,
the response and ``### End`` count. Each training prompt is encoded in one batched call (the
same work as the fast tokenizer's own batch encoding, less the intro line that every prompt
starts with: it is encoded once, see :func:`intro_ids`); the response starts right after the
token that covers the last character of the prompt prefix, which is the prefix's own
``### Response:\\n`` (a special token, so the text is split at it before pre-tokenization) --
even when a record's own text contains the key. A record where that does not hold (a tokenizer
whose special tokens do not split the text) is encoded as prefix and suffix separately.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from dollyflow.core.prompt import (DOLLY_SPECIAL_TOKENS, INTRO_BLURB, RESPONSE_KEY_NL, format_training_prompt,
                                   prompt_prefix, response_suffix)

EOS_TOKEN = "<|endoftext|>"

DROP_TOO_LONG = "too_long"
DROP_EMPTY_INSTRUCTION = "empty_instruction"
DROP_EMPTY_RESPONSE = "empty_response"

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer


def add_dolly_special_tokens(tokenizer):
    """Add ``### End``, ``### Instruction:`` and ``### Response:\\n`` as special tokens (in that
    order, as Dolly does) and set pad = eos. Returns the tokenizer (modified in place)."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; Dolly pads with eos")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": list(DOLLY_SPECIAL_TOKENS)})
    return tokenizer


def load_tokenizer(name_or_path: str, dolly_tokens: bool = True):
    """A fast Hugging Face tokenizer by local path or hub name, with Dolly's special tokens
    added and pad = eos (unless ``dolly_tokens=False``: a saved dollyflow tokenizer already has
    them, and adding them again is a no-op anyway)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{name_or_path}: a fast (tokenizers-backed) tokenizer is required")
    if dolly_tokens:
        add_dolly_special_tokens(tok)
    return tok


def ensure_pad_token(tokenizer):
    """pad = eos when the tokenizer has no pad token (Llama 3, Mistral, ...): padded positions are
    masked out of attention and loss, so which id they hold does not matter."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of Dolly's special tokens and of eos/pad, keyed by token text (eos/pad by role)."""
    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in DOLLY_SPECIAL_TOKENS if t in vocab}
    ids["eos"] = tokenizer.eos_token_id
    ids["pad"] = tokenizer.pad_token_id
    return ids


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_sha256(directory: str | Path) -> tuple[str, dict[str, str]]:
    """(combined digest, {file name: sha256}) of the files of a saved tokenizer directory.
    The combined digest hashes the sorted ``name:sha256`` lines, so it names the whole set."""
    directory = Path(directory)
    files = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
    combined = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
    return combined, files


def save_tokenizer(tokenizer, out_dir: str | Path) -> dict:
    """Save the tokenizer (``save_pretrained``) and describe it: directory, combined sha256,
    per-file sha256, vocabulary size and special token ids."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    combined, files = tokenizer_sha256(out_dir)
    return {"dir": str(out_dir), "sha256": combined, "files": files, "vocab_size": len(tokenizer),
            "special_token_ids": special_token_ids(tokenizer)}


def train_small_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2000):
    """Train a small byte-level BPE (``<|endoftext|>`` = id 0 = eos/bos/unk, like GPT-NeoX) on
    ``texts`` and save it as a Hugging Face tokenizer directory. For tests and the local demo
    when the real GPT-NeoX tokenizer is absent. Returns the loaded tokenizer (without Dolly
    tokens; :func:`load_tokenizer` adds them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                  unk_token=EOS_TOKEN)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


# ---------------------------------------------------------------------------------------------
# Rust backend, cached per process


_BACKENDS: dict[str, object] = {}
_BUILDS = [0]   # how many times this process built a tokenizer (tests check: once per distinct tokenizer)
_LOCK = threading.Lock()


def backend_json(tokenizer) -> str:
    """The serialized Rust tokenizer (with the added special tokens) of a HF fast tokenizer."""
    return tokenizer.backend_tokenizer.to_str()


def backend_from_json(text: str):
    """A :class:`tokenizers.Tokenizer` from its JSON text, built once per process and cached by
    the text's sha256 (Spark reuses Python workers, so each loads the tokenizer once)."""
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()
    with _LOCK:
        tok = _BACKENDS.get(key)
        if tok is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(text)
            tok.no_truncation()
            tok.no_padding()
            _BACKENDS[key] = tok
            _BUILDS[0] += 1
        return tok


def loaded_backends() -> int:
    """How many distinct tokenizers this process holds."""
    return len(_BACKENDS)


def backend_builds() -> int:
    """How many times this process has built a tokenizer from JSON (once per distinct one)."""
    return _BUILDS[0]


# ---------------------------------------------------------------------------------------------
# batched encoding


@dataclass
class EncodedBatch:
    """Per record: the training prompt's ids (None when dropped), the index of the first
    token that counts in the loss, the total length and the drop reason (None when kept)."""
    input_ids: list = field(default_factory=list)
    response_start: list = field(default_factory=list)
    length: list = field(default_factory=list)
    drop_reason: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def _blank(s: str | None) -> bool:
    return s is None or not s.strip()


#: Every prompt starts with this text, then ``### Instruction:``.
INTRO_SEGMENT = f"{INTRO_BLURB}\n\n"
_PROBES = (("Q", "R", "C"), ("  leading spaces", "x", ""), ("\nnewline first", "y", "z"),
           ("Übersetze: 你好 🌍", "Hallo ### End", "### Response:\n"), ("### Instruction: twice", "r", None))
_INTROS: dict[int, tuple[object, list[int] | None]] = {}


def intro_ids(backend) -> list[int] | None:
    """The ids of :data:`INTRO_SEGMENT` when it may be encoded once for all prompts: the ids of
    a whole prompt are then the intro's followed by those of the rest encoded alone. That holds
    when ``### Instruction:`` is an added token that splits the text (the pieces between added
    tokens are normalized and pre-tokenized each on its own, and the first piece is always the
    same) and the post-processor adds no token; checked once per backend on probe prompts.
    None (encode whole prompts) otherwise. Saves re-encoding ~20 tokens of every record."""
    with _LOCK:
        hit = _INTROS.get(id(backend))
        if hit is not None and hit[0] is backend:
            return hit[1]
    texts = [format_training_prompt(i, r, c) for i, r, c in _PROBES]
    enc = backend.encode_batch([INTRO_SEGMENT, *texts, *(t[len(INTRO_SEGMENT):] for t in texts)],
                               add_special_tokens=True)
    intro, n = enc[0].ids, len(texts)
    ok = bool(intro) and all(t.startswith(INTRO_SEGMENT) and enc[1 + k].ids == intro + enc[1 + n + k].ids
                             for k, t in enumerate(texts))
    with _LOCK:
        _INTROS[id(backend)] = (backend, intro if ok else None)   # holding the backend keeps its id unique
    return intro if ok else None


def encode_records(backend, instructions: Sequence[str | None], contexts: Sequence[str | None],
                   responses: Sequence[str | None], max_length: int) -> EncodedBatch:
    """Encode a batch of records into Dolly training prompts with one batched call.

    Records whose prompt is longer than ``max_length`` tokens are dropped (``too_long``, with
    their length kept), never truncated, so ``### End`` is never cut; records with a blank
    instruction or response are dropped too (``empty_instruction``/``empty_response``).
    """
    n = len(instructions)
    if not (len(contexts) == len(responses) == n):
        raise ValueError("instructions, contexts and responses must have the same length")
    out = EncodedBatch()
    reasons: list[str | None] = [None] * n
    keep: list[int] = []
    for i in range(n):
        if _blank(instructions[i]):
            reasons[i] = DROP_EMPTY_INSTRUCTION
        elif _blank(responses[i]):
            reasons[i] = DROP_EMPTY_RESPONSE
        else:
            keep.append(i)
    prefixes = [prompt_prefix(instructions[i], contexts[i]) for i in keep]
    intro = intro_ids(backend) if keep else None
    cut = len(INTRO_SEGMENT) if intro is not None else 0     # prompt_prefix starts with INTRO_SEGMENT
    texts = [p[cut:] + response_suffix(responses[i]) for p, i in zip(prefixes, keep)]
    encoded = backend.encode_batch(texts, add_special_tokens=True) if keep else []
    resp_id = backend.token_to_id(RESPONSE_KEY_NL)
    if keep and resp_id is None:
        raise ValueError("the tokenizer lacks Dolly's special tokens (load it with load_tokenizer)")
    ids: list = [None] * n
    starts: list = [None] * n
    lengths: list = [None] * n
    split: list[int] = []       # records whose prefix end is not a token boundary at "### Response:\n"
    for j, i in enumerate(keep):
        e = encoded[j]
        at = e.char_to_token(len(prefixes[j]) - 1 - cut)      # the token holding the prefix's last character
        if at is not None and cut:
            at += len(intro)
        whole = intro + e.ids if cut else e.ids
        if at is None or whole[at] != resp_id:
            split.append(j)
            continue
        starts[i], ids[i] = at + 1, whole
    if split:   # prefix and suffix encoded apart: the prefix must end with the key's token
        pre = backend.encode_batch([prefixes[j] for j in split], add_special_tokens=True)
        suf = backend.encode_batch([response_suffix(responses[keep[j]]) for j in split], add_special_tokens=False)
        for j, p, s in zip(split, pre, suf):
            p, s = p.ids, s.ids
            if not p or p[-1] != resp_id:
                raise ValueError("the prompt prefix does not end with the '### Response:\\n' token; "
                                 "the tokenizer must add it as a special token and append nothing")
            starts[keep[j]], ids[keep[j]] = len(p), p + s
    for i in keep:
        lengths[i] = len(ids[i])
        if lengths[i] > max_length:
            reasons[i] = DROP_TOO_LONG
            ids[i] = starts[i] = None
    out.input_ids, out.response_start, out.length, out.drop_reason = ids, starts, lengths, reasons
    return out


def labels_for(input_ids: Sequence[int], response_start: int) -> list[int]:
    """Dolly's labels: ``IGNORE_INDEX`` up to and including ``### Response:\\n``, ids after."""
    return [IGNORE_INDEX] * response_start + list(input_ids[response_start:])


def set_single_thread() -> None:
    """Spark parallelises across tasks: keep the Rust tokenizer to one thread per task."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
