"""Text normalisation, exact-duplicate keys and vectorised word shingling (engine-free).

Normalisation (used for exact keys and for shingling): Unicode NFC, case-fold, NFC again
(case-folding can decompose), every run of Unicode whitespace collapsed to one space, trimmed.

Shingling works on a *batch* of normalised texts at once, on their UTF-8 bytes, with numpy:

- a token is a maximal run of bytes that are neither ASCII whitespace nor ASCII punctuation
  (bytes >= 0x80, i.e. all non-ASCII characters, are word bytes);
- each token is hashed with a polynomial hash over its bytes (prefix sums modulo 2**64, so no
  Python loop per token), then mixed with the splitmix64 finaliser;
- a shingle is a word n-gram: the n token hashes of a window combined position-sensitively and
  mixed again, folded to 32 bits. A text with fewer than n tokens (but at least one) gets one
  shingle made of all its tokens; a text without tokens gets none.

Near-duplicate detection shingles a record in two *parts* (:func:`part_shingles`): the
instruction and the response joined (the "qa" part: what is asked and what is answered), and the
context (the passage) on its own. No shingle mixes the passage with the question or the answer,
and comparing the parts separately is what keeps different questions about one shared passage
apart (see :mod:`dollyflow.engine.dedupe`). A record without context has the same qa shingles as
its whole-record document (:func:`normalized_document`).
"""
from __future__ import annotations

import string
import unicodedata

import numpy as np
import xxhash

FIELD_SEPARATOR = "\x1f"

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_POLY_BASE = 0x100000001B3  # odd, so invertible modulo 2**64
_POLY_BASE_INV = pow(_POLY_BASE, -1, 1 << 64)
# Odd 64-bit constants weighting the positions of an n-gram (golden-ratio multiples).
_POSITION_WEIGHTS = np.array([(0x9E3779B97F4A7C15 * (2 * k + 1)) & _MASK64 for k in range(64)], dtype=_U64)

_SEPARATOR_BYTES = np.zeros(256, dtype=bool)
for _ch in string.whitespace + string.punctuation:
    _SEPARATOR_BYTES[ord(_ch)] = True


def normalize(text: str | None) -> str:
    """NFC, case-fold, NFC, collapse whitespace runs to one space and trim. ``None`` -> ``""``."""
    if not text:
        return ""
    folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())
    return " ".join(folded.split())


def normalized_document(instruction: str | None, context: str | None, response: str | None) -> str:
    """The three normalised fields joined by spaces: the whole record as one text, as a
    conventional MinHash dedupe shingles it (the benchmarks' datasketch baseline does). dollyflow
    itself shingles the parts separately (:func:`part_shingles`)."""
    return " ".join(p for p in (normalize(instruction), normalize(context), normalize(response)) if p)


def fields_and_key(instruction: str | None, context: str | None,
                   response: str | None) -> tuple[str, str, str, bytes]:
    """The normalised instruction, context and response and their :func:`exact_key`,
    normalising each field once."""
    fields = (normalize(instruction), normalize(context), normalize(response))
    key = xxhash.xxh3_128_digest(FIELD_SEPARATOR.join(fields).encode("utf-8", "surrogatepass"))
    return fields[0], fields[1], fields[2], key


def exact_key(instruction: str | None, context: str | None, response: str | None) -> bytes:
    """16-byte key equal for two records exactly when their normalised fields are equal
    (up to 128-bit hash collisions). Category is not part of the key."""
    joined = FIELD_SEPARATOR.join((normalize(instruction), normalize(context), normalize(response)))
    return xxhash.xxh3_128_digest(joined.encode("utf-8", "surrogatepass"))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on a uint64 array (returns a new array)."""
    z = np.asarray(x, dtype=_U64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> _U64(30)
        z *= _U64(0xBF58476D1CE4E5B9)
        z ^= z >> _U64(27)
        z *= _U64(0x94D049BB133111EB)
        z ^= z >> _U64(31)
    return z


def utf8_buffer(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate texts as UTF-8: returns (bytes as uint8 array, int64 offsets of length n+1)."""
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return data, offsets


_POWER_CACHE: list[np.ndarray] = []


def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached arrays of base**i and base**-i modulo 2**64 for i < size (grown by doubling)."""
    if not _POWER_CACHE or _POWER_CACHE[0].size < size:
        n = max(size, 1 << 16, 2 * (_POWER_CACHE[0].size if _POWER_CACHE else 0))
        with np.errstate(over="ignore"):
            powers = np.full(n, _POLY_BASE, dtype=_U64)
            powers[0] = 1
            np.cumprod(powers, out=powers)
            inv = np.full(n, _POLY_BASE_INV, dtype=_U64)
            inv[0] = 1
            np.cumprod(inv, out=inv)
        _POWER_CACHE[:] = [powers, inv]
    return _POWER_CACHE[0], _POWER_CACHE[1]


def token_hashes(data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash every token of every document in a UTF-8 buffer.

    Returns (hashes uint64, doc index int64) with one entry per token, in document order.
    """
    if data.size == 0:
        return np.zeros(0, dtype=_U64), np.zeros(0, dtype=np.int64)
    is_word = ~_SEPARATOR_BYTES[data]
    doc_start = np.zeros(data.size, dtype=bool)
    starts = offsets[:-1][offsets[:-1] < offsets[1:]]
    doc_start[starts] = True
    prev_word = np.empty(data.size, dtype=bool)
    prev_word[0] = False
    prev_word[1:] = is_word[:-1]
    tok_start = is_word & (~prev_word | doc_start)
    next_word = np.empty(data.size, dtype=bool)
    next_word[-1] = False
    next_word[:-1] = is_word[1:]
    doc_end = np.zeros(data.size, dtype=bool)
    ends = offsets[1:][offsets[:-1] < offsets[1:]] - 1
    doc_end[ends] = True
    tok_end = is_word & (~next_word | doc_end)
    s_idx = np.flatnonzero(tok_start)
    e_idx = np.flatnonzero(tok_end)
    if s_idx.size == 0:
        return np.zeros(0, dtype=_U64), np.zeros(0, dtype=np.int64)
    powers, inv_powers = _powers(data.size)
    with np.errstate(over="ignore"):
        prefix = np.cumsum((data.astype(_U64) + _U64(1)) * powers[: data.size], dtype=_U64)
        before = np.where(s_idx > 0, prefix[np.maximum(s_idx - 1, 0)], _U64(0))
        raw = prefix[e_idx] - before
        raw *= inv_powers[s_idx]
        raw += (e_idx - s_idx + 1).astype(_U64)  # length, so that prefixes differ more
    doc = np.searchsorted(offsets, s_idx, side="right") - 1
    return splitmix64(raw), doc.astype(np.int64)


def shingle_hashes(tokens: np.ndarray, docs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Word n-gram shingle hashes (uint32) and their doc indices, from per-token hashes.

    Windows never cross documents; a document with 1..n-1 tokens yields one shingle of all of
    its tokens. Duplicated shingles within a document are kept (MinHash ignores them).
    """
    if n < 1 or n > len(_POSITION_WEIGHTS):
        raise ValueError(f"ngram must be in 1..{len(_POSITION_WEIGHTS)}, got {n}")
    m = tokens.size
    if m == 0:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
    acc = np.zeros(m, dtype=_U64)
    same_doc = np.ones(m, dtype=bool)
    with np.errstate(over="ignore"):
        for k in range(n):  # loop over the n positions of the window, vectorised over tokens
            shifted = np.zeros(m, dtype=_U64)
            shifted_doc = np.full(m, -1, dtype=np.int64)
            shifted[: m - k] = tokens[k:]
            shifted_doc[: m - k] = docs[k:]
            inside = shifted_doc == docs
            acc += np.where(inside, shifted, _U64(0)) * _POSITION_WEIGHTS[k]
            same_doc &= inside
    # A full window, or the first token of a document shorter than n tokens.
    first_of_doc = np.ones(m, dtype=bool)
    first_of_doc[1:] = docs[1:] != docs[:-1]
    doc_tokens = np.bincount(docs, minlength=int(docs.max()) + 1)
    short = doc_tokens[docs] < n
    keep = same_doc | (first_of_doc & short)
    mixed = splitmix64(acc[keep])
    return (mixed >> _U64(32)).astype(np.uint32), docs[keep]


def batch_shingles(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes (uint32) and doc indices for a batch of already-normalised texts."""
    data, offsets = utf8_buffer(texts)
    tokens, docs = token_hashes(data, offsets)
    return shingle_hashes(tokens, docs, n)


def shingle_set(text: str, n: int) -> set[int]:
    """The set of shingle hashes of one normalised text (for tests and exact Jaccard)."""
    hashes, _ = batch_shingles([text], n)
    return set(hashes.tolist())


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def part_shingles(instructions: list[str], contexts: list[str], responses: list[str],
                  n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingles of the two parts of ``m`` records (already-normalised fields), in one pass.

    Returns (shingle hashes uint32, part index int64, non-decreasing) where part ``i < m`` is
    record i's qa part (its instruction and response joined by a space) and part ``m + i`` its
    context. A part without any word has no shingles.
    """
    m = len(instructions)
    if not len(contexts) == len(responses) == m:
        raise ValueError("instructions, contexts and responses must have the same length")
    qa = [f"{i} {r}" if i and r else i or r for i, r in zip(instructions, responses)]
    return batch_shingles(qa + list(contexts), n)
