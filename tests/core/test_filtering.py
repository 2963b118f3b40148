"""The filter job's decisions without Spark: personal data found and redacted with the right
offsets (Luhn-checked cards only), language with its undetermined short texts, each quality rule,
and the benchmark n-gram index."""
from __future__ import annotations

import json

import pytest

from dollyflow.config import ConfigError, load_config
from dollyflow.core.filtering import FilterSettings, RecordFilter, build_index
from dollyflow.core.filtering.pii import PiiDetector, redact
from dollyflow.core.filtering.quality import QualityRules, check, length_stats

pytest.importorskip("presidio_analyzer")
pytest.importorskip("lingua")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return load_config("filter", [f"tables.warehouse={tmp_path_factory.mktemp('wh')}"])


@pytest.fixture(scope="module")
def record_filter(cfg):
    return RecordFilter(FilterSettings.from_config(cfg.filter))


def test_pii_spans_and_redaction_offsets():
    det = PiiDetector({"email": "redact", "phone": "redact", "credit_card": "drop", "ip_address": "redact",
                       "iban": "drop"}, 0.4, ["US", "GB"])
    text = "Mail bob@example.com, call +1 415-555-2671, host 10.1.2.3, IBAN DE89370400440532013000."
    spans = det.find(text, "response")
    assert [(s.kind, s.text) for s in spans] == [("email", "bob@example.com"), ("phone", "+1 415-555-2671"),
                                                ("ip_address", "10.1.2.3"), ("iban", "DE89370400440532013000")]
    out, recs = redact(text, spans)
    assert out == "Mail <EMAIL>, call <PHONE>, host <IP_ADDRESS>, IBAN <IBAN>."
    assert all(text[r["start"]:r["end"]] == s.text for r, s in zip(recs, spans))
    assert det.first_drop(spans).kind == "iban"


def test_credit_cards_are_luhn_checked():
    det = PiiDetector({"credit_card": "drop"}, 0.4, ["US"])
    assert [s.kind for s in det.find("card 4111 1111 1111 1111 ok", "response")] == ["credit_card"]
    assert det.find("card 4111 1111 1111 1112 ok", "response") == []       # fails the Luhn check


def test_language_and_undetermined(record_filter):
    d = record_filter.decide("Quelle est la capitale de la France ?", None,
                             "La capitale de la France est Paris, une très belle ville.", "open_qa")
    assert (d.stage, d.reason, d.language) == ("language", "language_fr", "fr")
    d = record_filter.decide("Capital?", None, "Paris", "open_qa")     # too short to tell: kept
    assert d.stage is None and d.language is None


def test_quality_rules(cfg):
    r = QualityRules.from_config(cfg.filter)
    assert check("Write a poem", "", "Waves", "creative_writing", r)[0] == "empty_response"
    assert check("Which is a fish?", "", "Tuna", "classification", r) is None       # short answers are normal here
    assert check("Say hi", "", "  ", "classification", r)[0] == "empty_response"
    assert check("Describe rain.", "", "describe   RAIN.", "general_qa", r)[0] == "repeats_instruction"
    assert check("Summarise", "A long passage here.", "a long passage here.", "summarization", r)[0] == "repeats_context"
    spam = "\n".join(["buy cheap watches now and save money today"] * 8)
    reason, detail = check("Give ideas", "", spam, "brainstorming", r)
    assert reason == "repetition" and "dup_" in detail
    assert check("Numbers", "", "12 34 56 78 90 11 22", "brainstorming", r)[0] == "non_alpha"
    assert check("Year?", "", "1945", "open_qa", r) is None
    stats = length_stats({"general_qa": (100, 3.0, 0.3), "tiny": (3, 3.0, 0.3)}, 50)
    assert set(stats) == {"general_qa"}
    long = " ".join(f"w{i}" for i in range(2000))
    assert check("Explain", "", long, "general_qa", r, stats)[0] == "length_outlier"


def test_benchmark_index(tmp_path, cfg):
    p = tmp_path / "b.jsonl"
    q = "Which river flows through the ancient city of Rome and reaches the sea near Ostia today?"
    p.write_text(json.dumps({"question": q, "answer": "Tiber"}) + "\n" +
                 json.dumps({"question": "Short one?", "answer": "x"}) + "\n", encoding="utf-8")
    idx = build_index([str(p)], ["question", "answer"], 13)
    assert idx.refs == ["b.jsonl#0 (question)"] and idx.files[0]["skipped_short"] == 3
    item, words = idx.match("Tell me: WHICH river flows through the ancient city of Rome and reaches the sea, please")
    assert item == 0 and words.startswith("which river flows")
    assert idx.match("A river flows through a city.") is None
    with pytest.raises(ConfigError, match="filter.decontaminate: benchmark file .* does not exist"):
        build_index([str(tmp_path / "nope.jsonl")], ["question"], 13)
    with pytest.raises(ConfigError, match="has none of the fields"):
        build_index([str(p)], ["prompt"], 13)


def test_unknown_language_code_names_the_key(cfg):
    bad = load_config("filter", [f"tables.warehouse={cfg.tables.warehouse}", "filter.detect_languages=[en, zz]"])
    with pytest.raises(ConfigError, match="filter.detect_languages: 'zz'"):
        FilterSettings.from_config(bad.filter)


def test_short_lists_are_not_repetition_or_non_alpha(cfg):
    """Real dolly answers the Gopher rules, made for documents, would wrongly remove: a 20-word
    sentence whose 4-grams are all distinct, a numbered list (its markers are not words)."""
    r = QualityRules.from_config(cfg.filter)
    camels = ("Camels use the fat in their humps to keep them filled with energy and hydration for long "
              "periods of time.")
    assert check("Why do camels have humps?", "", camels, "open_qa", r) is None
    assert check("Name kinds of rain", "", "1. Mist\n2. Drizzle\n3. Sleet\n4. Downpour\n5. Freezing Rain\n6. Sun Shower",
                 "brainstorming", r) is None
    spam = " ".join(["the best watches are cheap watches"] * 10)      # 60 words, one sentence repeated
    assert check("Ideas?", "", spam, "brainstorming", r)[0] == "repetition"
