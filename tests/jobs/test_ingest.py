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
                "not-an-object": "not_an_object", "oversized": "oversized_line"}  # its 2 MB line > 4 x max_field_chars
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


BOM = b"\xef\xbb\xbf"


def _rec(i: int, **kw) -> dict:
    return {"instruction": f"Question {i}?", "context": "", "response": f"Answer {i}.", "category": "open_qa", **kw}


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.mark.parametrize("chunk", [1, 7, 40, 10_000])
def test_bom_is_dropped_at_the_start_of_a_file_only(tmp_path, chunk):
    """Whatever the byte ranges, the first line loses its BOM and keeps line number 1; a BOM at
    the start of a later line stays (and makes that line malformed JSON)."""
    from dollyflow.core.records import Rules, check_json_line
    from dollyflow.engine.ingest import count_line_starts, iter_json_lines
    f = tmp_path / "bom.jsonl"
    data = BOM + _jsonl([_rec(1)]) + BOM + _jsonl([_rec(2)]) + _jsonl([_rec(3)])
    f.write_bytes(data)
    bounds = list(range(0, len(data), chunk)) + [len(data)]
    got, first = [], 1
    for a, b in zip(bounds, bounds[1:]):
        got += list(iter_json_lines(str(f), a, b, first))
        first += count_line_starts(str(f), a, b)
    assert [n for n, _ in got] == [1, 2, 3]
    verdicts = [check_json_line(line, Rules()) for _, line in got]
    assert verdicts[0].record["instruction"] == "Question 1?" and not got[0][1].startswith(BOM)
    assert verdicts[1].reason == "malformed_json" and got[1][1].startswith(BOM)
    assert verdicts[2].record["instruction"] == "Question 3?"


@pytest.fixture(scope="module")
def inputs_run(spark, tmp_path_factory):
    """One ingest over a directory of awkward inputs: BOM-prefixed JSON Lines split into many
    byte-range tasks, a BOM-prefixed CSV, gzip JSON Lines, a CSV field over the csv module's
    limit, and files that are not read (hidden, _-prefixed, unknown extension, _delta_log/)."""
    import csv
    import gzip

    src = tmp_path_factory.mktemp("inputs")
    (src / "a.jsonl").write_bytes(BOM + _jsonl([_rec(i) for i in range(1, 6)]) + BOM + _jsonl([_rec(6)]))
    with open(src / "b.csv", "w", newline="", encoding="utf-8-sig") as f:   # Excel's "CSV UTF-8"
        w = csv.DictWriter(f, fieldnames=list(_rec(0)))
        w.writeheader()
        w.writerows([_rec(i) for i in range(10, 13)])
    (src / "c.jsonl.gz").write_bytes(gzip.compress(BOM + _jsonl([_rec(i) for i in range(20, 24)]) + b"{oops\n"
                                                   + _jsonl([_rec(24)])))
    with open(src / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(_rec(0)))
        w.writeheader()
        w.writerow(_rec(30))
        w.writerow(_rec(31, context="x" * 200_000))       # > csv.field_size_limit() default (131072)
        w.writerow(_rec(32, response="multi\nline"))
    for name in ("_SUCCESS", ".hidden.jsonl", "notes.txt", "e.jsonl.bz2"):
        (src / name).write_text(json.dumps(_rec(99)) + "\n")
    (src / "sub" / "_delta_log").mkdir(parents=True)
    (src / "sub" / "_delta_log" / "00000.json").write_text("{}\n")
    (src / "sub" / "f.ndjson").write_bytes(_jsonl([_rec(40)]))
    cfg = config(tmp_path_factory.mktemp("wh"), f"ingest.input={src}", "ingest.chunk_bytes=40")
    return cfg, ingest.run(cfg, spark), src


def test_bom_gzip_and_long_csv_fields_are_read(spark, inputs_run):
    cfg, s, src = inputs_run
    store = DeltaStore(spark, cfg.tables)
    bronze = {(r["source_file"].rsplit("/", 1)[1], r["source_line"]): r["instruction"]
              for r in store.read(cfg.tables.bronze).collect()}
    assert {k: v for k, v in bronze.items() if k[0] == "a.jsonl"} == \
           {("a.jsonl", n): f"Question {n}?" for n in range(1, 6)}            # line 1 despite its BOM
    assert {k for k in bronze if k[0] == "b.csv"} == {("b.csv", 2), ("b.csv", 3), ("b.csv", 4)}
    assert {k: v for k, v in bronze.items() if k[0] == "c.jsonl.gz"} == \
           {("c.jsonl.gz", n): f"Question {n + 19}?" for n in range(1, 5)} | {("c.jsonl.gz", 6): "Question 24?"}
    assert {k for k in bronze if k[0] == "d.csv"} == {("d.csv", 2), ("d.csv", 4)}
    assert ("f.ndjson", 1) in bronze
    q = {(r["source_file"].rsplit("/", 1)[1], r["source_line"]): r for r in store.read(cfg.tables.quarantine).collect()}
    assert {k: r["reason"] for k, r in q.items()} == {("a.jsonl", 6): "malformed_json",   # a BOM inside the file
                                                      ("c.jsonl.gz", 5): "malformed_json",
                                                      ("d.csv", 3): "oversized_field"}
    assert "200000 chars" in q[("d.csv", 3)]["detail"]
    assert (s["lines_read"], s["rows_new"], s["rows_quarantined"]) == (5 + 1 + 3 + 6 + 3 + 1, 5 + 3 + 5 + 2 + 1, 3)


def test_skipped_files_are_listed_with_their_reason(spark, inputs_run):
    cfg, s, src = inputs_run
    skipped = {p.replace(str(src), ""): r for p, r in ((x["path"], x["reason"]) for x in s["skipped_files"])}
    assert set(skipped) == {"/_SUCCESS", "/.hidden.jsonl", "/notes.txt", "/e.jsonl.bz2", "/sub/_delta_log/"}
    assert skipped["/notes.txt"].startswith("unknown extension '.txt'")
    assert skipped["/e.jsonl.bz2"].startswith("unknown extension '.jsonl.bz2'")
    assert skipped["/.hidden.jsonl"].startswith("hidden") and skipped["/_SUCCESS"].startswith("name starts with '_'")
    assert s["files"] == 5 and len(s["inputs"]) == 5
    (run,) = DeltaStore(spark, cfg.tables).read(cfg.tables.ingest_runs).collect()
    assert sorted((r["path"], r["reason"]) for r in run["skipped_files"]) == \
           sorted((x["path"], x["reason"]) for x in s["skipped_files"])


def test_two_ingests_over_overlapping_files_at_once_keep_one_row_per_record(spark, sample_path, tmp_path,
                                                                           monkeypatch):
    """Both runs compute their new rows against the same bronze version (a barrier holds each
    at its bronze commit until the other got there), then commit: bronze still gets each record
    once, and each run's accounting adds up, the later one counting what the other inserted."""
    import threading

    lines = open(sample_path, encoding="utf-8").read().splitlines()
    for name, part in (("a", lines[:70]), ("b", lines[30:])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.jsonl").write_text("\n".join(part) + "\n", encoding="utf-8")
    real_merge = DeltaStore.merge
    barrier = threading.Barrier(2, timeout=120)

    def merge(self, df, name, *args, **kwargs):
        if name == "bronze":
            barrier.wait()
        return real_merge(self, df, name, *args, **kwargs)

    monkeypatch.setattr(DeltaStore, "merge", merge)
    results, errors = {}, []

    def run(name):
        try:
            results[name] = ingest.run(config(tmp_path / "wh", f"ingest.input={tmp_path / name}"), spark)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    store = DeltaStore(spark, config(tmp_path / "wh").tables)
    ids = [r["record_id"] for r in store.read("bronze").select("record_id").collect()]
    assert len(ids) == len(set(ids)) == 100
    a, b = results["a"], results["b"]
    assert a["rows_new"] + b["rows_new"] == 100
    assert sorted([a["rows_existing"], b["rows_existing"]]) == [0, 40]
    later = a if a["rows_existing"] else b
    assert later["rows_existing_by_kind"] == {"inserted_concurrently": 40}
    assert {a["bronze_version"], b["bronze_version"]} == {0, 1}
    history = {h["version"]: h["run_id"] for h in store.history("bronze")}
    assert history == {a["bronze_version"]: a["run_id"], b["bronze_version"]: b["run_id"]}


def test_accounting_that_does_not_add_up_fails_the_run(spark, sample_path, tmp_path, monkeypatch):
    """A fault that loses a row between the key work and bronze's commit is caught by the
    measured counts (rows existing are counted from the keys, not derived from rows new)."""
    from dollyflow.core.counts import CountMismatch

    lines = open(sample_path, encoding="utf-8").read().splitlines()[:10]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines + lines[:2]) + "\n", encoding="utf-8")
    real_merge = DeltaStore.merge

    def lossy_merge(self, df, name, *args, **kwargs):
        if name == "bronze":
            first = df.orderBy("source_line").first()["record_id"]
            df = df.filter(df.record_id != first)
        return real_merge(self, df, name, *args, **kwargs)

    monkeypatch.setattr(DeltaStore, "merge", lossy_merge)
    cfg = config(tmp_path / "wh", f"ingest.input={src}")
    with pytest.raises(CountMismatch, match=r"lines read = 12, but rows new \(9, bronze's commit\) \+ rows existing "
                                            r"\(2: repeated_in_input 2\).* = 11 \(difference -1\)"):
        ingest.run(cfg, spark)
    assert not DeltaStore(spark, cfg.tables).exists(cfg.tables.ingest_runs)   # no accounting row for it


def test_a_run_id_that_escapes_its_directory_never_overwrites_the_schema(spark, sample_path, tmp_path):
    """Issue 18: ``run_id=..`` made ingest's staging directory ``<schema>/_staging/..`` = the schema
    directory, which ``write.mode("overwrite")`` replaced (every path-based table gone). Config
    refuses such a run id; a config changed after validation is refused before anything is written."""
    from dollyflow.config import ConfigError

    with pytest.raises(ConfigError, match="run_id: '..' is not a plain name"):
        config(tmp_path, f"ingest.input={sample_path}", "run_id=..")
    cfg = config(tmp_path, f"ingest.input={sample_path}")
    ingest.run(cfg, spark)
    store = DeltaStore(spark, cfg.tables)
    version, rows = store.version(cfg.tables.bronze), store.count(cfg.tables.bronze)
    cfg.run_id = ".."
    with pytest.raises(ValueError, match="does not lie below"):
        ingest.run(cfg, spark)
    assert store.version(cfg.tables.bronze) == version and store.count(cfg.tables.bronze) == rows


def test_glob_star_stays_in_its_directory_and_double_star_recurses(tmp_path):
    """`dir/*.jsonl` is the files of dir only (as a shell reads it), `dir/**/*.jsonl` every one
    below dir (dir itself included), and a directory input is read recursively."""
    from dollyflow.engine.ingest import list_inputs
    d = tmp_path / "d"
    for rel in ("a.jsonl", "b.jsonl", "sub/c.jsonl", "sub/deeper/e.jsonl", "sub/x.csv"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(json.dumps(_rec(1)) + "\n")

    def names(spec):
        return sorted(f.uri[len(str(d)) + 1:] for f in list_inputs(spec).files)

    assert names(f"{d}/*.jsonl") == ["a.jsonl", "b.jsonl"]
    assert names(f"{d}/**/*.jsonl") == ["a.jsonl", "b.jsonl", "sub/c.jsonl", "sub/deeper/e.jsonl"]
    assert names(f"{d}/*/*.jsonl") == ["sub/c.jsonl"]
    assert names(f"{d}/**/deeper/*") == ["sub/deeper/e.jsonl"]
    assert names(f"{d}/?.jsonl") == ["a.jsonl", "b.jsonl"]
    assert names(str(d)) == ["a.jsonl", "b.jsonl", "sub/c.jsonl", "sub/deeper/e.jsonl", "sub/x.csv"]
    with pytest.raises(FileNotFoundError, match=r"no input files .* match .*/sub/\*\.txt"):
        list_inputs(f"{d}/sub/*.txt")


def _oversized_file(path, big: int = 6 << 20) -> bytes:
    """Line 2: `big` bytes of one JSON string (no newline inside); line 5, the last: `big` bytes
    without any newline after them; the others valid records."""
    data = (_jsonl([_rec(1)]) + b'{"instruction": "' + b"x" * big + b'"}\n' + _jsonl([_rec(3), _rec(4)])
            + b"y" * big)
    path.write_bytes(data)
    return data


def _parse_file(path, size: int, chunk_bytes: int, max_field_chars: int) -> tuple[list[tuple], int]:
    """(source_line, reason, detail, raw) of every line, parsed chunk by chunk as the tasks do, and
    the peak of Python's memory allocations while parsing (tracemalloc)."""
    import tracemalloc

    from dollyflow.core.records import Rules
    from dollyflow.engine.ingest import InputFile, count_line_starts, parse_chunk, plan_chunks
    warm = path.parent / "warm-up.jsonl"      # the first parse imports modules: not the reader's memory
    warm.write_bytes(_jsonl([_rec(0)]) + b"x\n")
    for c in plan_chunks([InputFile(str(warm), "json", warm.stat().st_size)], 1 << 20):
        list(parse_chunk({**c, "first_line": 1}, Rules(), raw_limit=100))
    chunks = plan_chunks([InputFile(str(path), "json", size)], chunk_bytes)
    first, rows = 1, []
    for c in chunks:
        c["first_line"] = first
        first += count_line_starts(str(path), c["start"], c["end"])
    tracemalloc.start()
    try:
        for c in chunks:
            for b in parse_chunk(c, Rules(max_field_chars=max_field_chars), raw_limit=100):
                rows += zip(b.column("source_line").to_pylist(), b.column("reason").to_pylist(),
                            b.column("detail").to_pylist(), b.column("raw").to_pylist())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return rows, peak


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 1 << 20, 5000])
def test_oversized_line_is_quarantined_without_reading_it_whole(tmp_path, chunk_bytes):
    """A line over 4 x max_field_chars bytes is quarantined as oversized_line, read in bounded
    pieces (the reader's peak memory stays far below the line), and the lines after it keep
    their exact numbers, however the file is cut into byte ranges."""
    f = tmp_path / "big.jsonl"
    big = 6 << 20
    data = _oversized_file(f, big)
    rows, peak = _parse_file(f, len(data), chunk_bytes, max_field_chars=1000)
    assert peak < big // 2, peak       # read in 256 KB pieces, never whole
    assert [(n, r) for n, r, _, _ in rows] == [(1, None), (2, "oversized_line"), (3, None), (4, None),
                                              (5, "oversized_line")]
    by_line = {n: (d, raw) for n, _, d, raw in rows}
    assert by_line[2][0].startswith(f"line of {big + 19} bytes > 4000")
    assert by_line[5][0].startswith(f"line of {big} bytes > 4000")
    assert by_line[2][1].startswith('{"instruction": "xxx') and by_line[2][1].endswith(f"...[{big + 19} total]")
    assert len(by_line[2][1]) < 200


def test_oversized_csv_line_is_quarantined_and_the_next_rows_read(tmp_path):
    from dollyflow.core.records import Rules
    from dollyflow.engine.ingest import _iter_csv
    f = tmp_path / "big.csv"
    f.write_text("instruction,context,response,category\n"
                 "Q1?,,A1.,open_qa\n" + "Q2?,," + "z" * 50_000 + ",open_qa\nQ3?,,A3.,open_qa\n", encoding="utf-8")
    got = [(n, v.reason, getattr(raw, "total", None)) for n, v, raw in _iter_csv(str(f), Rules(max_field_chars=1000))]
    assert got == [(2, None, None), (3, "oversized_line", 50_013), (4, None, None)]


def test_oversized_lines_through_the_job_with_small_chunks(spark, tmp_path):
    f = tmp_path / "big.jsonl"
    _oversized_file(f, 3 << 20)
    cfg = config(tmp_path / "wh", f"ingest.input={f}", "ingest.chunk_bytes=700000", "ingest.max_field_chars=1000")
    s = ingest.run(cfg, spark)
    assert (s["lines_read"], s["rows_new"], s["quarantined_by_reason"]) == (5, 3, {"oversized_line": 2})
    store = DeltaStore(spark, cfg.tables)
    assert sorted((r["source_line"], r["instruction"]) for r in store.read(cfg.tables.bronze).collect()) == \
           [(1, "Question 1?"), (3, "Question 3?"), (4, "Question 4?")]
    assert sorted(r["source_line"] for r in store.read(cfg.tables.quarantine).collect()) == [2, 5]


ARRAY_CASES = [
    (b"[]", []),
    (b' [\n ]\n', []),
    (b'[1,,2]', [(1, 1, b"1"), (1, 2, "an empty element"), (1, 3, b"2")]),
    (b'[{"a": 1},\n]', [(1, 1, b'{"a": 1}'), (2, 2, "an empty element")]),
    (b'[{"a": 1}', [(1, 1, b'{"a": 1}'), (1, 2, "the file ends before the array's closing ']'")]),
    (b'[{"a": "1}, {"b": 2}]', [(1, 1, "the file ends inside this element")]),      # an unclosed string
    (b'[{"a": [1}, {"b": 2}]', [(1, 1, b'{"a": [1}, {"b": 2}]'), (1, 2, "the file ends before")]),  # bad nesting
    (b'[{"a": 1}]\n{"b": 2}\n', [(1, 1, b'{"a": 1}'), (2, 2, "data after the array's closing ']'")]),
    (BOM + b'[1, "x,]\\"]", [2, {"c": "}"}]]', [(1, 1, b"1"), (1, 2, b'"x,]\\"]"'), (1, 3, b'[2, {"c": "}"}]')]),
    (b'[{"a": 1} {"b": 2},\n 3]', [(1, 1, b'{"a": 1} {"b": 2}'), (2, 2, b"3")]),   # missing comma: one bad element
]


@pytest.mark.parametrize("block", [1, 2, 3, 5, 1 << 18])
@pytest.mark.parametrize("data,expected", ARRAY_CASES)
def test_json_array_elements_lines_and_problems(data, expected, block):
    """Elements with the line each starts on, whatever the read blocks cut (inside strings,
    escapes, brackets); where the array breaks, a problem naming why, and reading stops."""
    import io

    from dollyflow.engine.ingest import ArrayProblem, iter_json_array
    got = [(line, i, e.detail[:len(x)] if isinstance(e, ArrayProblem) else e)
           for (line, i, e), (_, _, x) in zip(iter_json_array(io.BytesIO(data), 1000, block), expected + [(0, 0, "")] * 9)]
    assert got == expected


def test_json_array_element_over_the_bound_is_kept_short(tmp_path):
    import io

    from dollyflow.engine.ingest import OversizedLine, iter_json_array
    data = b'[\n {"instruction": "' + b"x" * 100_000 + b'"},\n {"a": 2}\n]'
    (l1, i1, e1), (l2, i2, e2) = iter_json_array(io.BytesIO(data), 1000, block=4096)
    assert isinstance(e1, OversizedLine) and len(e1) == 1000 and e1.total == 100_019 and (l1, i1) == (2, 1)
    assert (l2, i2, e2) == (3, 2, b'{"a": 2}')


def test_json_array_files_are_read_as_records(spark, sample_path, tmp_path):
    """A .json file holding one JSON array (pretty-printed, or on one line) gives its objects as
    records, each with the line it starts on; a bad element is one quarantined row naming its
    index; equal records on one line are still told apart; .json files of JSON Lines and .jsonl
    files stay JSON Lines."""
    records = [json.loads(line) for line in open(sample_path, encoding="utf-8")][:6]
    src = tmp_path / "src"
    src.mkdir()
    pretty = [records[0], records[1], {"instruction": "No response"}, records[2]]
    (src / "pretty.json").write_text(json.dumps(pretty, indent=2), encoding="utf-8")
    (src / "oneline.json").write_text(json.dumps([records[3], records[3], records[4]]), encoding="utf-8")
    (src / "lines.json").write_text(json.dumps(records[5]) + "\n", encoding="utf-8")
    (src / "array.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    cfg = config(tmp_path / "wh", f"ingest.input={src}")
    s = ingest.run(cfg, spark)
    assert (s["lines_read"], s["rows_new"], s["rows_existing"]) == (4 + 3 + 1 + 1, 6, 1)
    assert s["quarantined_by_reason"] == {"missing_field": 1, "not_an_object": 1}
    store = DeltaStore(spark, cfg.tables)
    bronze = {(r["source_file"].rsplit("/", 1)[1], r["source_line"]): r["instruction"]
              for r in store.read(cfg.tables.bronze).collect()}
    starts = [n for n, line in enumerate((src / "pretty.json").read_text().splitlines(), 1) if line == "  {"]
    assert {k: v for k, v in bronze.items() if k[0] == "pretty.json"} == \
           {("pretty.json", starts[0]): records[0]["instruction"], ("pretty.json", starts[1]): records[1]["instruction"],
            ("pretty.json", starts[3]): records[2]["instruction"]}
    assert {k for k in bronze if k[0] != "pretty.json"} == {("oneline.json", 1), ("lines.json", 1)}
    q = {r["source_file"].rsplit("/", 1)[1]: r for r in store.read(cfg.tables.quarantine).collect()}
    assert q["pretty.json"]["source_line"] == starts[2] and q["pretty.json"]["reason"] == "missing_field"
    assert q["pretty.json"]["detail"].startswith(f"element 3 of the JSON array (line {starts[2]}): response")
    assert q["array.jsonl"]["reason"] == "not_an_object" and q["array.jsonl"]["source_line"] == 1
    assert s["rows_existing_by_kind"] == {"repeated_in_input": 1}


def test_parquet_reads_only_the_mapped_columns(tmp_path, monkeypatch):
    """A Parquet file with a large extra column: only the columns field_map names are fetched
    (measured as the bytes the reader pulls from the file), raw is built for rejected rows only
    and holds just the mapped columns."""
    import io
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dollyflow.core.records import Rules
    from dollyflow.engine import ingest as engine
    rows = 200
    blob = [os.urandom(50_000) for _ in range(rows)]                      # 10 MB, incompressible
    table = pa.table({"prompt": [f"Question {i}?" for i in range(rows)],
                      "answer": ["" if i == 7 else f"Answer {i}." for i in range(rows)],
                      "category": ["open_qa"] * rows, "blob": blob})
    path = tmp_path / "wide.parquet"
    pq.write_table(table, path, compression="none", row_group_size=rows)
    fetched = []

    class CountingFile(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            fetched.append(len(data))
            return data

        def readinto(self, b):
            n = super().readinto(b)
            fetched.append(n)
            return n

    class CountingFS:
        def open_input_file(self, p):
            return CountingFile(p, "rb")

    real = engine.filesystem
    monkeypatch.setattr(engine, "filesystem", lambda uri: (CountingFS(), real(uri)[1]))
    chunk = {"file": str(path), "format": "parquet", "start": 0, "end": 1, "first_line": 1, "file_index": 0}
    rules = Rules(categories=frozenset({"open_qa"}), field_map={"instruction": "prompt", "response": "answer"})
    (batch,) = list(engine.parse_chunk(chunk, rules, raw_limit=2000))
    assert 0 < sum(fetched) < 200_000 < path.stat().st_size // 50, sum(fetched)
    got = batch.to_pydict()
    assert got["reason"] == [None] * 7 + ["empty_field"] + [None] * (rows - 8)
    assert got["raw"][7] == '{"prompt": "Question 7?", "answer": "", "category": "open_qa"}'
    assert got["raw"].count(None) == rows - 1 and got["instruction"][8] == "Question 8?"


def test_empty_input_fails_naming_the_file_after_recording_the_run(spark, tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    cfg = config(tmp_path / "wh", f"ingest.input={src}")
    with pytest.raises(ingest.NoRecordsError, match=rf"holds no line to read .* in 1 file: {src}") as err:
        ingest.run(cfg, spark)
    assert err.value.summary["lines_read"] == 0
    store = DeltaStore(spark, cfg.tables)
    (run,) = store.read(cfg.tables.ingest_runs).collect()
    assert (run["run_id"], run["lines_read"], run["rows_new"]) == (cfg.run_id, 0, 0)
    assert not store.exists(cfg.tables.bronze)


def test_all_lines_quarantined_fails_with_the_top_reasons_after_committing_them(spark, sample_path, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "x\n{oops\n[1]\n' + json.dumps({"instruction": "Q", "category": "open_qa"})
                   + "\nnot json\n", encoding="utf-8")
    cfg = config(tmp_path / "wh", f"ingest.input={src}")
    with pytest.raises(ingest.NoRecordsError, match=r"no valid record: all 5 lines of 1 file: .*bad\.jsonl were "
                                                    r"quarantined \(top reasons: malformed_json 3, missing_field 1, "
                                                    r"not_an_object 1\)"):
        ingest.run(cfg, spark)
    store = DeltaStore(spark, cfg.tables)
    assert store.read(cfg.tables.quarantine).filter(f"run_id = '{cfg.run_id}'").count() == 5
    (run,) = store.read(cfg.tables.ingest_runs).collect()
    assert (run["lines_read"], run["rows_quarantined"]) == (5, 5)
    # valid lines that are all in bronze already: a normal, idempotent re-run, no error
    good = tmp_path / "good.jsonl"
    good.write_text(sample_path.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    assert ingest.run(config(tmp_path / "wh", f"ingest.input={good}"), spark)["rows_new"] == 1
    again = ingest.run(config(tmp_path / "wh", f"ingest.input={good}"), spark)
    assert (again["rows_new"], again["rows_existing"]) == (0, 1)
