"""Personal data in a record's text: presidio's pattern recognizers (no NLP engine, no model),
one per kind, and the redaction of what they find with typed placeholders.

Kinds: ``email`` (presidio's EmailRecognizer; its top-level-domain check uses tldextract's
bundled suffix list, never the network), ``phone`` (PhoneRecognizer: Google's libphonenumber
matcher over ``phone_regions``), ``credit_card`` (CreditCardRecognizer, Luhn-checked),
``ip_address`` (IpRecognizer, IPv4 and IPv6), ``iban`` (IbanRecognizer, checksum-verified).
``person`` needs a name model and is never enabled here (the configuration refuses it).
Every recognizer runs with ``nlp_artifacts=None``: a pattern match, its validation, and presidio's
score (context words are not looked at).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

#: the placeholder that replaces a redacted span of each kind
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "credit_card": "<CREDIT_CARD>",
                "ip_address": "<IP_ADDRESS>", "iban": "<IBAN>", "person": "<PERSON>"}
FIELDS = ("instruction", "context", "response")


@dataclass(frozen=True)
class Span:
    field: str
    kind: str
    start: int
    end: int
    text: str
    score: float


def _recognizers(kinds: list[str], phone_regions: list[str]) -> dict:
    """kind -> (presidio recognizer, its entity names). presidio is imported here: its package
    import pulls in spaCy and transformers (seconds), paid once per worker process."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, EmailRecognizer, IbanRecognizer,
                                                          IpRecognizer, PhoneRecognizer)

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)   # the bundled list: no network

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):  # presidio's check, with the offline suffix list
            return offline(pattern_text).fqdn != ""

    makers = {"email": OfflineEmailRecognizer, "credit_card": CreditCardRecognizer, "ip_address": IpRecognizer,
              "iban": IbanRecognizer, "phone": lambda: PhoneRecognizer(supported_regions=tuple(phone_regions))}
    out = {}
    for kind in kinds:
        r = makers[kind]()
        out[kind] = (r, list(r.supported_entities))
    return out


class PiiDetector:
    """Finds personal data of the enabled kinds in text; ``actions``: kind -> redact | drop."""

    def __init__(self, actions: dict[str, str], min_score: float, phone_regions: list[str]):
        self.actions = {k: a for k, a in actions.items() if a in ("redact", "drop")}
        self.min_score = float(min_score)
        self.recognizers = _recognizers(sorted(self.actions), phone_regions) if self.actions else {}

    def find(self, text: str | None, field: str) -> list[Span]:
        """Non-overlapping spans in ``text`` (where two overlap, the higher score, then the longer, wins)."""
        if not text:
            return []
        found = []
        for kind, (rec, entities) in self.recognizers.items():
            for r in rec.analyze(text, entities=entities, nlp_artifacts=None):
                if r.score >= self.min_score:
                    found.append(Span(field, kind, int(r.start), int(r.end), text[r.start:r.end], float(r.score)))
        found.sort(key=lambda s: (-s.score, -(s.end - s.start), s.start))
        kept: list[Span] = []
        for s in found:
            if all(s.end <= k.start or s.start >= k.end for k in kept):
                kept.append(s)
        return sorted(kept, key=lambda s: s.start)

    def scan(self, fields: dict[str, str | None]) -> list[Span]:
        return [s for f in FIELDS for s in self.find(fields.get(f), f)]

    def first_drop(self, spans: list[Span]) -> Span | None:
        """The first span whose kind is set to drop the record, or None."""
        return next((s for s in spans if self.actions.get(s.kind) == "drop"), None)


def redact(text: str, spans: list[Span]) -> tuple[str, list[dict]]:
    """``text`` with each span replaced by its kind's placeholder, and what was replaced:
    ``{field, kind, start, end, placeholder}`` with start/end in the *original* text."""
    out, records, pos = [], [], 0
    for s in sorted(spans, key=lambda s: s.start):
        out.append(text[pos:s.start])
        out.append(PLACEHOLDERS[s.kind])
        records.append({"field": s.field, "kind": s.kind, "start": s.start, "end": s.end,
                        "placeholder": PLACEHOLDERS[s.kind]})
        pos = s.end
    out.append(text[pos:])
    return "".join(out), records


def redactions_json(records: list[dict]) -> str | None:
    return json.dumps(records, sort_keys=True) if records else None
