"""Instruction records: validation of raw input and the stable record id.

Engine-free: the ingest job calls these inside Spark tasks, tests call them directly.

A record is valid when ``instruction`` and ``response`` are non-empty strings, ``context`` is a
string or absent/null (stored as ""), ``category`` is one of the configured categories, and no
field is longer than the configured limit. Every rejection has exactly one reason, checked in
this order: ``oversized_line`` (a line, or a JSON array's element, over :func:`max_line_bytes`: the
reader never holds it whole), ``invalid_utf8``, ``blank_line``, ``malformed_json``
(``malformed_row`` for CSV), ``not_an_object``,
``missing_field``, ``wrong_type``, ``oversized_field``, ``empty_field``, ``unknown_category``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

FIELDS = ("instruction", "context", "response", "category")
REASONS = ("oversized_line", "invalid_utf8", "blank_line", "malformed_json", "malformed_row", "not_an_object", "missing_field",
           "wrong_type", "oversized_field", "empty_field", "unknown_category")

import xxhash

#: A line may take this many bytes per ``ingest.max_field_chars`` (UTF-8 needs up to 4 bytes a
#: character; a record's three text fields share the line): see :func:`max_line_bytes`.
LINE_BYTES_PER_FIELD_CHAR = 4


def max_line_bytes(max_field_chars: int) -> int:
    """The longest line (without its newline) the readers take in: 4 x ``max_field_chars``
    bytes. A longer one is quarantined as ``oversized_line``, read in bounded pieces and never
    whole, so a file without newlines cannot exhaust a worker's memory."""
    return LINE_BYTES_PER_FIELD_CHAR * int(max_field_chars)

try:  # orjson is ~3x faster than json, and stricter: it rejects lone surrogate escapes
    import orjson as _orjson

    _loads = _orjson.loads
    _JSONError: tuple = (_orjson.JSONDecodeError,)
    _SURROGATES_POSSIBLE = False
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
    _JSONError = (ValueError,)
    _SURROGATES_POSSIBLE = True


def record_id(instruction: str, context: str, response: str, category: str) -> str:
    """Stable id of a record's content: the 128-bit XXH3 hash (32 hex chars) of the four fields,
    each length-prefixed so field boundaries count (after the field mapping; absent context is
    ""). Two lines get the same id exactly when their four fields are identical strings."""
    payload = f"{len(instruction)}:{instruction}{len(context)}:{context}" \
              f"{len(response)}:{response}{len(category)}:{category}"
    return xxhash.xxh3_128_hexdigest(payload.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class Rules:
    """What makes a record acceptable (from ``IngestConfig``)."""
    categories: frozenset[str] = frozenset()   # empty: any category
    max_field_chars: int = 100_000
    field_map: dict[str, str] = field(default_factory=dict)   # dolly field -> input key
    default_category: str = ""
    from_json: bool = False   # values come from our JSON parser (orjson never yields surrogates)

    def key(self, name: str) -> str:
        return self.field_map.get(name, name)

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        """(dolly field, input key) for the four fields, in FIELDS order."""
        cached = self.__dict__.get("_keys")
        if cached is None:
            cached = tuple((name, self.key(name)) for name in FIELDS)
            object.__setattr__(self, "_keys", cached)
        return cached


@dataclass
class Verdict:
    record: dict[str, str] | None = None     # the four fields, when valid
    reason: str | None = None                # one of REASONS, when not
    detail: str = ""


def has_surrogates(s: str) -> bool:
    """True when ``s`` holds lone surrogates (undecodable bytes or escapes): not valid UTF-8 text."""
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_object(obj: Any, rules: Rules) -> Verdict:
    """Validate one parsed input object (a JSON object, a CSV row, a Parquet row)."""
    if type(obj) is not dict:
        return Verdict(reason="not_an_object", detail=f"got a JSON {type(obj).__name__}")
    check_surrogates = _SURROGATES_POSSIBLE or not rules.from_json
    values = []
    for name, key in rules.keys:
        value = obj.get(key)
        if value is None:
            if name == "context":
                value = ""
            elif name == "category" and rules.default_category and key not in obj:
                value = rules.default_category
            else:
                return Verdict(reason="missing_field", detail=f"{key} is {'null' if key in obj else 'absent'}")
        if type(value) is not str:
            return Verdict(reason="wrong_type", detail=f"{key} is a {type(value).__name__}, not a string")
        if check_surrogates and has_surrogates(value):
            return Verdict(reason="invalid_utf8", detail=f"{key} holds a lone surrogate escape")
        values.append(value)
    limit = rules.max_field_chars
    for (name, key), value in zip(rules.keys, values):
        if len(value) > limit:
            return Verdict(reason="oversized_field", detail=f"{key} has {len(value)} chars > {limit}")
    instruction, context, response, category = values
    if not instruction.strip():
        return Verdict(reason="empty_field", detail=f"{rules.key('instruction')} is empty after trimming")
    if not response.strip():
        return Verdict(reason="empty_field", detail=f"{rules.key('response')} is empty after trimming")
    if rules.categories and category not in rules.categories:
        return Verdict(reason="unknown_category", detail=f"category {category[:100]!r}")
    return Verdict(record=dict(zip(FIELDS, values)))


def check_json_line(raw: bytes, rules: Rules) -> Verdict:
    """Validate one JSON Lines line (without its newline). Invalid UTF-8 is detected on the raw
    bytes, never silently replaced."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Verdict(reason="invalid_utf8", detail=f"byte {exc.start}: {exc.reason}")
    if not text.strip():
        return Verdict(reason="blank_line")
    try:
        obj = _loads(text)
    except _JSONError as exc:
        return Verdict(reason="malformed_json", detail=str(exc)[:200])
    except RecursionError:
        return Verdict(reason="malformed_json", detail="nested too deeply")
    return check_object(obj, rules if rules.from_json else _json_rules(rules))


def _json_rules(rules: Rules) -> Rules:
    from dataclasses import replace
    return replace(rules, from_json=True)


def raw_text(raw: bytes | str, limit: int, total: int | None = None) -> str:
    """A printable, truncated copy of a rejected line for the quarantine table. ``total``: the
    line's real length when ``raw`` is only its beginning (an ``oversized_line``)."""
    if isinstance(raw, bytes):
        text = raw[: limit * 4].decode("utf-8", "backslashreplace")
    else:
        text = raw.encode("utf-8", "backslashreplace").decode("utf-8")
    total = len(raw) if total is None else total
    return text if len(text) <= limit and total <= len(raw) else text[:limit] + f"...[{total} total]"
