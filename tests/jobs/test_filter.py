"""The filter job end to end on Spark: the real dolly sample plus planted records for every reason
(an email in a context, a phone number in a response, a credit-card number, a French answer, a
copied benchmark question, a one-word response, a response repeating its instruction), ingested
and deduplicated, then filtered against a benchmark file; outputs, counts, the rerun, bad input,
and tokenize reading curated.

Tests in this module share one warehouse and run in file order.
"""
from __future__ import annotations

import json
import shutil

import pytest

from dollyflow.config import ConfigError, load_config
from dollyflow.core.records import record_id

pytestmark = pytest.mark.spark

BENCH_Q = ("Which river flows through the ancient city of Rome and reaches the Tyrrhenian Sea near the "
           "harbour of Ostia?")
PLANTED = {
    "email": {"instruction": "Who organises the team offsite this year?",
              "context": "For questions about the offsite, write to anna.smith@example.org before Friday.",
              "response": "Anna organises the offsite this year; questions go to her by email before Friday.",
              "category": "closed_qa"},
    "phone": {"instruction": "How can customers reach the support desk?", "context": "",
              "response": "Customers can call the support desk at +1 415-555-2671 on any weekday morning.",
              "category": "open_qa"},
    "card": {"instruction": "What card did the customer use for the order?", "context": "",
             "response": "The customer paid with the card 4111 1111 1111 1111, which expires next year.",
             "category": "open_qa"},
    "french": {"instruction": "Quelle est la capitale de la France et pourquoi est-elle importante ?", "context": "",
               "response": "La capitale de la France est Paris, une ville tres importante pour la culture, "
                           "l'histoire et l'economie du pays.", "category": "open_qa"},
    "benchmark": {"instruction": BENCH_Q, "context": "", "response": "The Tiber flows through Rome.",
                  "category": "open_qa"},
    "one_word": {"instruction": "Write a short poem about the sea at night.", "context": "",
                 "response": "Waves", "category": "creative_writing"},
    "repeat": {"instruction": "Describe the water cycle in simple terms for a child.", "context": "",
               "response": "Describe the water cycle in simple terms for a child.", "category": "general_qa"},
}
EXPECTED = {"card": ("pii", "pii_credit_card"), "french": ("language", "language_fr"),
            "benchmark": ("decontaminate", "benchmark_overlap"), "one_word": ("quality", "empty_response"),
            "repeat": ("quality", "repeats_instruction")}


def rid(r: dict) -> str:
    return record_id(r["instruction"], r.get("context") or "", r["response"], r["category"])


@pytest.fixture(scope="module")
def world(spark, sample_path, tmp_path_factory):
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import dedupe, ingest
    from dollyflow.jobs import filter as filter_job

    root = tmp_path_factory.mktemp("filter")
    inputs = root / "inputs"
    inputs.mkdir()
    shutil.copy(sample_path, inputs / "sample.jsonl")
    with open(inputs / "planted.jsonl", "w", encoding="utf-8") as fh:
        for r in PLANTED.values():
            fh.write(json.dumps(r) + "\n")
    bench = root / "bench.jsonl"
    with open(bench, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"question": "What is two plus two?", "answer": "four"}) + "\n")
        fh.write(json.dumps({"question": BENCH_Q, "answer": "The Tiber"}) + "\n")
    base = [f"tables.warehouse={root / 'warehouse'}", "spark.shuffle_partitions=4"]
    ingest.run(load_config("ingest", [*base, f"ingest.input={inputs}"]), spark)
    dedupe.run(load_config("dedupe", base), spark)
    fbase = [*base, f"filter.decontaminate=[{bench}]"]
    cfg = load_config("filter", fbase)
    summary = filter_job.run(cfg, spark)
    store = DeltaStore(spark, cfg.tables)
    return {"cfg": cfg, "base": base, "fbase": fbase, "root": root, "store": store, "summary": summary,
            "bench": bench}


def rows(world, name: str) -> list[dict]:
    return [r.asDict() for r in world["store"].read(getattr(world["cfg"].tables, name)).collect()]


def test_every_planted_reason_lands_in_filtered(world):
    filtered = {r["record_id"]: r for r in rows(world, "filtered")}
    for key, (stage, reason) in EXPECTED.items():
        r = filtered.get(rid(PLANTED[key]))
        assert r is not None, f"planted {key} record was not removed"
        assert (r["stage"], r["reason"]) == (stage, reason), (key, r)
        assert r["filter_run_id"] == world["cfg"].run_id and r["silver_version"] == world["summary"]["silver_version"]
    card = filtered[rid(PLANTED["card"])]
    assert card["span"] == "4111 1111 1111 1111" and "response" in card["detail"]
    bench = filtered[rid(PLANTED["benchmark"])]
    assert "bench.jsonl#1 (question)" in bench["detail"] and len(bench["span"].split()) == 13
    assert bench["span"] in BENCH_Q.lower()


def test_email_and_phone_are_redacted_in_curated(world):
    curated = {r["record_id"]: r for r in rows(world, "curated")}
    email = curated[rid(PLANTED["email"])]
    assert "anna.smith@example.org" not in email["context"] and "<EMAIL>" in email["context"]
    red = json.loads(email["redactions"])
    original = PLANTED["email"]["context"]
    assert red == [{"field": "context", "kind": "email", "start": original.index("anna."),
                    "end": original.index("anna.") + len("anna.smith@example.org"), "placeholder": "<EMAIL>"}]
    phone = curated[rid(PLANTED["phone"])]
    assert "<PHONE>" in phone["response"] and "555-2671" not in phone["response"]
    assert [x["kind"] for x in json.loads(phone["redactions"])] == ["phone"]
    assert email["filter_run_id"] == world["cfg"].run_id
    s = world["summary"]
    assert s["redactions"].get("email", 0) >= 1 and s["redactions"].get("phone", 0) >= 1


def test_counts_add_up_and_the_run_row_says_so(world):
    s, store, t = world["summary"], world["store"], world["cfg"].tables
    silver_rows = store.count(t.silver, s["silver_version"])
    curated, filtered = rows(world, "curated"), rows(world, "filtered")
    assert silver_rows == len(curated) + len(filtered) == s["rows_in"]
    assert (s["rows_kept"], s["rows_removed"]) == (len(curated), len(filtered))
    assert not {r["record_id"] for r in curated} & {r["record_id"] for r in filtered}
    per_reason: dict = {}
    for r in filtered:
        per_reason.setdefault(r["stage"], {}).setdefault(r["reason"], 0)
        per_reason[r["stage"]][r["reason"]] += 1
    assert s["removed"] == per_reason
    assert len(curated) >= 90          # the real sample survives (English, human-written)
    (run,) = rows(world, "filter_runs")
    assert run["run_id"] == world["cfg"].run_id and json.loads(run["removed"]) == per_reason
    assert (run["rows_in"], run["rows_kept"], run["curated_version"]) == (silver_rows, len(curated),
                                                                          s["curated_version"])
    assert json.loads(run["settings"])["decontaminate"][0]["sha256"]
    assert set(rows(world, "curated")[0]) >= {"record_id", "instruction", "context", "response", "category",
                                                 "redactions", "filter_run_id"}


def test_a_rerun_on_the_same_silver_and_settings_writes_nothing(world, spark):
    from dollyflow.jobs import filter as filter_job
    store, t = world["store"], world["cfg"].tables
    before = {n: store.version(getattr(t, n)) for n in ("curated", "filtered", "filter_runs")}
    again = filter_job.run(load_config("filter", world["fbase"]), spark)
    assert again["skipped"] is True and again["previous_run_id"] == world["cfg"].run_id
    assert again["removed"] == world["summary"]["removed"]
    assert {n: store.version(getattr(t, n)) for n in before} == before


def test_changed_settings_run_again(world, spark):
    """Another setting (phones dropped instead of redacted) is a new run: the phone record moves to filtered."""
    from dollyflow.jobs import filter as filter_job
    s = filter_job.run(load_config("filter", [*world["fbase"], "filter.pii.phone=drop"]), spark)
    assert s["skipped"] is False and s["removed"]["pii"].get("pii_phone", 0) >= 1
    filtered = {r["record_id"]: r for r in rows(world, "filtered")}
    assert filtered[rid(PLANTED["phone"])]["reason"] == "pii_phone"
    assert s["rows_in"] == s["rows_kept"] + s["rows_removed"] == world["summary"]["rows_in"]


def test_bad_input_fails_at_once_naming_the_key(world, spark):
    from dollyflow.jobs import filter as filter_job
    store, t = world["store"], world["cfg"].tables
    before = store.version(t.curated)
    with pytest.raises(ConfigError, match=r"filter.decontaminate: benchmark file .*missing.jsonl.* does not exist"):
        filter_job.run(load_config("filter", [*world["base"], f"filter.decontaminate=[{world['root'] / 'missing.jsonl'}]"]),
                       spark)
    with pytest.raises(ConfigError, match=r"filter.languages: 'xx' is not an ISO 639-1"):
        filter_job.run(load_config("filter", [*world["base"], "filter.languages=[xx]"]), spark)
    with pytest.raises(ConfigError, match=r"filter.dup_line_frac: must lie between 0 and 1"):
        load_config("filter", [*world["base"], "filter.dup_line_frac=1.5"])
    with pytest.raises(ConfigError, match=r"filter.pii.email: 'hide'"):
        load_config("filter", [*world["base"], "filter.pii.email=hide"])
    assert store.version(t.curated) == before


def test_tokenize_reads_curated_by_default(world, spark, tokenizer_path):
    from dollyflow.jobs import tokenize
    cfg = load_config("tokenize", [*world["base"], f"tokenize.tokenizer={tokenizer_path}", "tokenize.test_size=0.1",
                                   "tokenize.max_length=512"])
    s = tokenize.run(cfg, spark)
    store, t = world["store"], world["cfg"].tables
    assert s["source_table"] == "curated" and s["silver"] == store.location(t.curated)
    assert s["silver_version"] == store.version(t.curated)
    assert s["records_in"] == store.count(t.curated)
    (run,) = [r.asDict() for r in store.read(t.tokenize_runs).collect()]
    assert run["source_table"] == "curated" and run["silver_version"] == store.version(t.curated)
