"""The language of a record (instruction + response) with lingua, whose models ship in its wheel.

The detector chooses among a configured set of languages (fewer: faster and less memory); a text
with fewer letters than ``min_chars``, or one lingua cannot decide on, is *undetermined* and kept.
"""
from __future__ import annotations

from dollyflow.config.errors import ConfigError


def _iso(code: str, key: str):
    from lingua import IsoCode639_1
    try:
        return IsoCode639_1.from_str(str(code).lower())
    except ValueError:
        raise ConfigError(f"{key}: {code!r} is not an ISO 639-1 language code lingua knows "
                          "(e.g. en, fr, de, es)") from None


def check_codes(keep: list[str], among: list[str]) -> list[str]:
    """The detector's languages (``among`` plus ``keep``), lower-case; an unknown code fails naming its key."""
    for c in keep:
        _iso(c, "filter.languages")
    for c in among:
        _iso(c, "filter.detect_languages")
    codes = sorted({str(c).lower() for c in [*keep, *among]})
    if len(codes) < 2:
        codes = sorted({*codes, "en", "fr"})     # lingua needs two languages to choose between
    return codes


class LanguageDetector:
    def __init__(self, keep: list[str], among: list[str], min_chars: int):
        from lingua import LanguageDetectorBuilder
        codes = check_codes(keep, among)
        self.keep = {c.lower() for c in keep}
        self.min_chars = int(min_chars)
        self.detector = LanguageDetectorBuilder.from_iso_codes_639_1(
            *[_iso(c, "filter.detect_languages") for c in codes]).build()

    def detect(self, text: str) -> str | None:
        """ISO 639-1 code (lower case), or None when undetermined (too short, or no decision)."""
        if sum(ch.isalpha() for ch in text) < self.min_chars:
            return None
        lang = self.detector.detect_language_of(text)
        return None if lang is None else lang.iso_code_639_1.name.lower()
