import json

import pytest

from dollyflow.core.records import REASONS, Rules, check_json_line, check_object, raw_text, record_id

RULES = Rules(categories=frozenset({"open_qa", "closed_qa"}), max_field_chars=50)
GOOD = {"instruction": "Why?", "context": "", "response": "Because.", "category": "open_qa"}


def line(obj) -> bytes:
    return json.dumps(obj).encode()


def test_valid_record_and_missing_context():
    v = check_json_line(line({k: v for k, v in GOOD.items() if k != "context"}), RULES)
    assert v.reason is None and v.record["context"] == ""
    v = check_json_line(line({**GOOD, "context": None}), RULES)
    assert v.record["context"] == ""


@pytest.mark.parametrize("raw,reason", [
    (b'{"instruction": "caf\xe9 \xff", "context": "", "response": "x", "category": "open_qa"}', "invalid_utf8"),
    (b"   ", "blank_line"),
    (b'{"instruction": "Why', "malformed_json"),
    (b'["instruction", "context"]', "not_an_object"),
    (line({k: v for k, v in GOOD.items() if k != "response"}), "missing_field"),
    (line({**GOOD, "instruction": 12345}), "wrong_type"),
    (line({**GOOD, "context": "x" * 51}), "oversized_field"),
    (line({**GOOD, "instruction": "  \t "}), "empty_field"),
    (line({**GOOD, "response": ""}), "empty_field"),
    (line({**GOOD, "category": "poetry_slam"}), "unknown_category"),
    (b'{"instruction": "\\ud800", "context": "", "response": "x", "category": "open_qa"}', None),
])
def test_each_reason(raw, reason):
    v = check_json_line(raw, RULES)
    if reason is None:  # a lone surrogate escape is not valid text: rejected either way
        assert v.reason in ("invalid_utf8", "malformed_json")
    else:
        assert v.reason == reason and v.record is None
    assert v.reason in REASONS


def test_invalid_utf8_is_not_replaced():
    v = check_json_line(b'{"instruction": "\xff", "response": "x", "category": "open_qa"}', RULES)
    assert v.reason == "invalid_utf8"
    assert "\\xff" in raw_text(b"\xff abc", 100)


def test_field_map_and_default_category():
    rules = Rules(categories=frozenset(), field_map={"instruction": "prompt", "response": "answer"},
                  default_category="general_qa")
    v = check_object({"prompt": "p", "answer": "a"}, rules)
    assert v.record == {"instruction": "p", "context": "", "response": "a", "category": "general_qa"}
    assert check_object({"instruction": "p", "answer": "a"}, rules).reason == "missing_field"


def test_record_id_is_stable_and_content_sensitive():
    a = record_id("q", "", "r", "open_qa")
    assert a == record_id("q", "", "r", "open_qa") and len(a) == 32
    assert a != record_id("Q", "", "r", "open_qa")
    assert a != record_id("q", "r", "", "open_qa")   # field boundaries matter



def test_record_id_is_pinned():
    """Pinned values: a change of the id function would orphan every bronze row ever written.
    The payload is each field prefixed by its length in characters (not bytes), UTF-8 encoded,
    hashed with XXH3-128."""
    import xxhash
    assert record_id("When?", "", "Now.", "open_qa") == "a23b15f47fb194909305b2304f246131"
    assert xxhash.xxh3_128_hexdigest(b"5:When?0:4:Now.7:open_qa") == "a23b15f47fb194909305b2304f246131"
    assert record_id("caf\u00e9 \u2013 ok", "ctx", "r", "general_qa") == "97801f59972f193d9b24aae4e2a92c0b"


def test_raw_text_truncates():
    assert raw_text(b"x" * 10, 4) == "xxxx...[10 total]"


def test_oversized_line_reason_and_its_raw_text():
    from dollyflow.core.records import max_line_bytes
    assert "oversized_line" in REASONS and REASONS[0] == "oversized_line"   # decided before parsing
    assert max_line_bytes(100_000) == 400_000
    head = b'{"instruction": "' + b"x" * 100
    assert raw_text(head, 20, total=5_000_000) == '{"instruction": "xxx...[5000000 total]'
    assert raw_text(b"short", 20, total=5) == "short"
