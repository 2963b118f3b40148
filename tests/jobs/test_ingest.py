"""The ingest job end to end on local Spark: bronze, quarantine, accounting, idempotence."""
import json

import pytest

from dollyflow.config import load_config
from dollyflow.engine.delta import DeltaStore
from dollyflow.jobs import ingest

pytestmark = pytest.mark.spark


def config(tmp, *overrides):
    return load_config("ingest", [f"tables.warehouse={tmp}", "spark.shuffle_partitions=4", *overrides])


@pytest.fixture(scope="module")
def mixed(make_corpus):
    """A realistic mixed file: planted duplicates, every bad-line kind, one 2 MB record."""
    return make_corpus(3000, oversized=True, bad_rate=0.02, seed=7)


@pytest.fixture(scope="module")
def mixed_run(spark, mixed, tmp_path_factory):
    corpus, truth = mixed
    wh = tmp_path_factory.mktemp("wh")
    # small chunks, so the file is split over many tasks and chunk boundaries are exercised
    cfg = config(wh, f"ingest.input={corpus}", "ingest.chunk_bytes=200000")
    summary = ingest.run(cfg, spark)
    return cfg, summary, corpus, truth


def truth_lines(truth):
    return {t["line"]: t for t in map(json.loads, open(truth))}


def test_every_bad_line_is_quarantined_with_its_reason(spark, mixed_run):
    cfg, summary, corpus, truth = mixed_run
    expected = {"truncated-json": "malformed_json", "missing-field": "missing_field",
                "wrong-type": "wrong_type", "empty-instruction": "empty_field",
                "unknown-category": "unknown_category", "invalid-utf8": "invalid_utf8",
                "not-an-object": "not_an_object", "oversized": "oversized_field"}
    store = DeltaStore(spark, cfg.tables)
    q = {r["source_line"]: r for r in store.read(cfg.tables.quarantine).collect()}
    bad = {n: t for n, t in truth_lines(truth).items() if t["kind"] == "bad"}
    assert set(q) == set(bad)
    for n, t in bad.items():
        assert q[n]["reason"] == expected[t["defect"]], (n, t, q[n])
        assert q[n]["source_file"] == str(corpus)
        assert len(q[n]["raw"]) <= cfg.ingest.raw_max_chars + 40      # truncated
    utf8 = [r for r in q.values() if r["reason"] == "invalid_utf8"]
    assert utf8 and all("\ufffd" not in r["raw"] and "\\x" in r["raw"] for r in utf8)
    assert set(summary["quarantined_by_reason"]) == set(expected.values())


def test_accounting_identity_and_runs_table(spark, mixed_run):
    cfg, summary, corpus, truth = mixed_run
    lines = sum(1 for _ in open(corpus, "rb"))
    assert summary["lines_read"] == lines == len(truth_lines(truth))
    assert summary["lines_read"] == summary["rows_new"] + summary["rows_existing"] + summary["rows_quarantined"]
    store = DeltaStore(spark, cfg.tables)
    assert store.read(cfg.tables.bronze).count() == summary["rows_new"]
    run = store.read(cfg.tables.ingest_runs).filter(f"run_id = '{cfg.run_id}'").collect()
    assert len(run) == 1
    assert run[0]["lines_read"] == lines and run[0]["rows_quarantined"] == summary["rows_quarantined"]
    assert sum(run[0]["quarantined_by_reason"].values()) == summary["rows_quarantined"]


def test_bronze_rows_carry_exact_source_lines(spark, mixed_run):
    cfg, summary, corpus, truth = mixed_run
    raw = open(corpus, "rb").read().split(b"\n")
    bronze = DeltaStore(spark, cfg.tables).read(cfg.tables.bronze).collect()
    assert len({r["record_id"] for r in bronze}) == len(bronze)        # one row per record_id
    for r in bronze[:300]:
        obj = json.loads(raw[r["source_line"] - 1])
        assert obj["instruction"] == r["instruction"] and obj["response"] == r["response"]
        assert obj.get("context") or "" == r["context"]
    assert {r["run_id"] for r in bronze} == {cfg.run_id}
    assert len({r["ingested_at"] for r in bronze}) == 1


def test_reingest_is_idempotent_and_new_lines_add_only_those(spark, sample_path, tmp_path):
    lines = open(sample_path, encoding="utf-8").read().splitlines()
    first = tmp_path / "in" / "a.jsonl"
    first.parent.mkdir()
    first.write_text("\n".join(lines[:60]) + "\n", encoding="utf-8")
    cfg = config(tmp_path / "wh", f"ingest.input={first.parent}")
    s1 = ingest.run(cfg, spark)
    store = DeltaStore(spark, cfg.tables)
    v1 = store.version(cfg.tables.bronze)
    assert s1["rows_new"] == 60
    s2 = ingest.run(config(tmp_path / "wh", f"ingest.input={first.parent}"), spark)
    assert (s2["rows_new"], s2["rows_existing"]) == (0, 60)
    assert store.version(cfg.tables.bronze) == v1                   # no new bronze version
    # the file grows by 40 lines and a copy of an old line: only the 40 are added
    first.write_text("\n".join(lines + [lines[0]]) + "\n", encoding="utf-8")
    s3 = ingest.run(config(tmp_path / "wh", f"ingest.input={first.parent}"), spark)
    assert (s3["rows_new"], s3["rows_existing"], s3["lines_read"]) == (40, 61, 101)
    assert store.read(cfg.tables.bronze).count() == 100
    assert store.read(cfg.tables.ingest_runs).count() == 3


def test_field_mapping_csv_and_parquet(spark, tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"prompt": "Name a colour.", "answer": "Blue.", "kind": "open_qa", "notes": ""},
            {"prompt": "Summarise: multi\nline", "answer": "A, \"quoted\" answer", "kind": "summarization",
             "notes": "some context"},
            {"prompt": "", "answer": "empty prompt", "kind": "open_qa", "notes": ""}]
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "export.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist([{**r, "prompt": r["prompt"] and r["prompt"] + " (pq)"} for r in rows]),
                   src / "export.parquet")
    cfg = config(tmp_path / "wh", f"ingest.input={src}", "ingest.field_map={instruction: prompt, "
                 "response: answer, category: kind, context: notes}")
    s = ingest.run(cfg, spark)
    assert (s["lines_read"], s["rows_new"], s["rows_quarantined"]) == (6, 4, 2)
    assert s["quarantined_by_reason"] == {"empty_field": 2}
    bronze = {(r["source_file"].rsplit(".", 1)[1], r["source_line"]): r
              for r in DeltaStore(spark, cfg.tables).read(cfg.tables.bronze).collect()}
    csv2 = bronze[("csv", 3)]   # header is line 1; the second record starts on line 3
    assert csv2["instruction"] == "Summarise: multi\nline" and csv2["context"] == "some context"
    assert csv2["response"] == 'A, "quoted" answer' and csv2["category"] == "summarization"
    assert bronze[("parquet", 2)]["instruction"] == "Summarise: multi\nline (pq)"


def test_glob_input_and_cli(spark, sample_path, tmp_path, capsys):
    from dollyflow.cli import run_job
    d = tmp_path / "g"
    d.mkdir()
    lines = open(sample_path, encoding="utf-8").read().splitlines()
    (d / "part1.jsonl").write_text("\n".join(lines[:10]) + "\n\n", encoding="utf-8")  # + a blank line
    (d / "part2.jsonl").write_text("\n".join(lines[10:15]), encoding="utf-8")        # no final newline
    (d / "ignored.txt").write_text("not an input")
    assert run_job("ingest", [f"tables.warehouse={tmp_path / 'wh'}", f"ingest.input={d}/part*.jsonl"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] == 2 and out["lines_read"] == 16 and out["rows_new"] == 15
    assert out["quarantined_by_reason"] == {"blank_line": 1}


@pytest.mark.parametrize("data", [b"a\nb\nc\n", b"a\nb\nc", b"\n\nx\n", b"abc", b"a\n"])
def test_chunk_line_starts_add_up(tmp_path, data):
    from dollyflow.engine.ingest import count_line_starts, iter_json_lines
    f = tmp_path / "f.jsonl"
    f.write_bytes(data)
    whole = list(iter_json_lines(str(f), 0, len(data), 1))
    for size in range(1, len(data) + 1):
        bounds = list(range(0, len(data), size)) + [len(data)]
        got, first = [], 1
        for a, b in zip(bounds, bounds[1:]):
            got += list(iter_json_lines(str(f), a, b, first))
            first += count_line_starts(str(f), a, b)
        assert got == whole, size
        assert first - 1 == len(whole)


def test_csv_invalid_utf8_row_is_quarantined_not_replaced(spark, tmp_path):
    src = tmp_path / "bad.csv"
    src.write_bytes(b"instruction,context,response,category\n"
                    b"Name a fruit.,,Apple.,open_qa\n"
                    b"caf\xe9 \xff,,x,open_qa\n"
                    b"Name a tree.,,Oak.,open_qa\n")
    cfg = config(tmp_path / "wh", f"ingest.input={src}")
    s = ingest.run(cfg, spark)
    assert (s["rows_new"], s["quarantined_by_reason"]) == (2, {"invalid_utf8": 1})
    (q,) = DeltaStore(spark, cfg.tables).read(cfg.tables.quarantine).collect()
    assert q["source_line"] == 3 and "\ufffd" not in q["raw"]
