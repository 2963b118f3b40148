"""The filter job's decisions, engine-free: personal data (:mod:`.pii`), language
(:mod:`.language`), quality heuristics (:mod:`.quality`) and benchmark decontamination
(:mod:`.decontaminate`), and :class:`RecordFilter`, which applies them in that order to a batch
of records: the first stage that removes a record names its reason; a kept record has its
personal data of the kinds set to ``redact`` replaced by typed placeholders.

The libraries (presidio-analyzer, lingua-language-detector, datatrove: the ``filter`` extra) are
imported when a :class:`RecordFilter` is built, so importing this package costs nothing.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from dollyflow.core.filtering.decontaminate import BenchmarkIndex, build_index
from dollyflow.core.filtering.language import LanguageDetector, check_codes
from dollyflow.core.filtering.pii import FIELDS, PLACEHOLDERS, PiiDetector, redact, redactions_json
from dollyflow.core.filtering.quality import QualityRules, check, length_stats

#: bump when a rule changes what it decides (part of the settings fingerprint)
ALGORITHM_VERSION = 2
STAGES = ("pii", "language", "quality", "decontaminate")
DEFAULT_PII = {"email": "redact", "phone": "redact", "credit_card": "drop", "ip_address": "redact",
               "iban": "drop", "person": "off"}

__all__ = ["ALGORITHM_VERSION", "STAGES", "FilterSettings", "RecordFilter", "Decision", "BenchmarkIndex",
           "build_index", "check_codes", "length_stats", "PLACEHOLDERS", "FIELDS"]


@dataclass(frozen=True)
class FilterSettings:
    """Everything that decides the result (its JSON is the settings fingerprint of filter_runs)."""
    pii: dict
    pii_min_score: float
    phone_regions: tuple[str, ...]
    languages: tuple[str, ...]
    detect_languages: tuple[str, ...]
    language_min_chars: int
    quality: QualityRules
    decontaminate: tuple[dict, ...]     # per benchmark file: path, sha256, rows, items, skipped_short
    decontaminate_fields: tuple[str, ...]
    ngram: int
    algorithm: int = ALGORITHM_VERSION

    @classmethod
    def from_config(cls, f, benchmark_files: list[dict] | None = None) -> "FilterSettings":
        check_codes(list(f.languages), list(f.detect_languages))
        return cls(pii={**DEFAULT_PII, **dict(f.pii)}, pii_min_score=float(f.pii_min_score),
                   phone_regions=tuple(f.phone_regions), languages=tuple(c.lower() for c in f.languages),
                   detect_languages=tuple(c.lower() for c in f.detect_languages),
                   language_min_chars=int(f.language_min_chars), quality=QualityRules.from_config(f),
                   decontaminate=tuple(benchmark_files or ()), decontaminate_fields=tuple(f.decontaminate_fields),
                   ngram=int(f.ngram))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass
class Decision:
    """One record's outcome: ``stage``/``reason`` None when kept (then the fields may be redacted)."""
    instruction: str
    context: str | None
    response: str
    redactions: str | None = None
    stage: str | None = None
    reason: str | None = None
    detail: str | None = None
    span: str | None = None
    language: str | None = None       # detected code; None: undetermined (or not reached)
    redacted_kinds: str | None = None  # "email,phone" (for the counts)


class RecordFilter:
    """Applies the four stages to records (callable on worker processes: build once per process)."""

    def __init__(self, settings: FilterSettings, index: BenchmarkIndex | None = None,
                 length: dict | None = None):
        self.s = settings
        self.pii = PiiDetector(settings.pii, settings.pii_min_score, list(settings.phone_regions))
        self.lang = LanguageDetector(list(settings.languages), list(settings.detect_languages),
                                     settings.language_min_chars)
        self.index = index
        self.length = length or {}

    def decide(self, instruction: str | None, context: str | None, response: str | None,
               category: str | None) -> Decision:
        ins, ctx, res = instruction or "", context, response or ""
        # 1. personal data: a kind set to drop removes the record; the others are redacted
        spans = self.pii.scan({"instruction": ins, "context": ctx, "response": res})
        drop = self.pii.first_drop(spans)
        if drop is not None:
            return Decision(ins, ctx, res, stage="pii", reason=f"pii_{drop.kind}",
                            detail=f"{drop.kind} in {drop.field} at {drop.start}-{drop.end} (score {drop.score:.2f})",
                            span=drop.text)
        records = []
        fields = {"instruction": ins, "context": ctx, "response": res}
        for name in FIELDS:
            mine = [s for s in spans if s.field == name]
            if mine and fields[name]:
                fields[name], rec = redact(fields[name], mine)
                records += rec
        ins, ctx, res = fields["instruction"], fields["context"], fields["response"]
        kinds = ",".join(sorted(r["kind"] for r in records)) or None
        kept = dict(redactions=redactions_json(records), redacted_kinds=kinds)
        # 2. language of instruction + response
        lang = self.lang.detect(f"{ins}\n{res}")
        if lang is not None and lang not in self.s.languages:
            return Decision(ins, ctx, res, stage="language", reason=f"language_{lang}", language=lang,
                            detail=f"detected {lang} on instruction + response; kept: {', '.join(self.s.languages)}",
                            **kept)
        # 3. quality
        q = check(ins, ctx or "", res, category or "", self.s.quality, self.length)
        if q is not None:
            return Decision(ins, ctx, res, stage="quality", reason=q[0], detail=q[1], language=lang,
                            span=res[:200] if q[0] != "length_outlier" else None, **kept)
        # 4. benchmark decontamination
        if self.index is not None:
            for name, text in (("instruction", ins), ("context", ctx), ("response", res)):
                m = self.index.match(text)
                if m is not None:
                    item, words = m
                    return Decision(ins, ctx, res, stage="decontaminate", reason="benchmark_overlap", language=lang,
                                    detail=f"{name} shares a {len(words.split())}-word n-gram with "
                                           f"{self.index.refs[item]}: {self.index.texts[item][:120]!r}",
                                    span=words, **kept)
        return Decision(ins, ctx, res, language=lang, **kept)
