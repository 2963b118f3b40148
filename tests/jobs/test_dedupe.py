"""The dedupe job end to end on Spark: one ingest of a make_corpus corpus plus the real dolly
sample with planted copies and different questions about one shared passage, one dedupe, then
accuracy, outputs, survivor rule, idempotency, partition independence and bronze time travel.

Tests in this module share one warehouse and run in file order (the last one appends to bronze).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from dollyflow.config import load_config
from dollyflow.testing.dedupe_scoring import line_record_ids, read_truth, score_records
from dollyflow.core.records import record_id

pytestmark = pytest.mark.spark

CORPUS_LINES = 3000
PLANTED = 20


def planted_copies(sample_path: Path, out: Path) -> list[dict]:
    """The sample's records (returned, not written), then, written to ``out``, an exact variant
    (case/space) and a near variant (one word of the response replaced) of the first PLANTED
    records whose instruction and response have at least 15 words together: the edit is measured
    against that part alone (a shared context does not count), and one replaced word in 15 words
    keeps its bigram Jaccard near 0.75, clear of the 0.7 threshold."""
    rows = [json.loads(line) for line in open(sample_path, encoding="utf-8") if line.strip()]
    rng = random.Random(3)
    lines = [dict(r, _kind="original", _of=i) for i, r in enumerate(rows)]
    picked = [i for i, r in enumerate(rows)
              if len(f"{r['instruction']} {r['response']}".split()) >= 15
              and len(r["response"].split()) >= 6][:PLANTED]
    for i in picked:
        r = rows[i]
        lines.append(dict(r, instruction="  " + r["instruction"].upper() + " ", _kind="exact", _of=i))
        words = r["response"].split(" ")
        words[rng.randrange(1, len(words) - 1)] = "zzplanted"
        lines.append(dict(r, response=" ".join(words), _kind="near", _of=i))
    with open(out, "w", encoding="utf-8") as fh:
        for line in lines[len(rows):]:
            fh.write(json.dumps({k: v for k, v in line.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
    return lines


def rid_of(line: dict) -> str:
    return record_id(line["instruction"], line.get("context") or "", line["response"], line["category"])


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def world(spark, make_corpus, sample_path, shared_passage, tmp_path_factory):
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import dedupe, ingest

    corpus, truth = make_corpus(CORPUS_LINES, edit_rate=0.03)
    root = tmp_path_factory.mktemp("dedupe")
    first, inputs = root / "first", root / "inputs"
    first.mkdir()
    inputs.mkdir()
    shutil.copy(sample_path, first / "sample.jsonl")
    write_jsonl(first / "shared-passage.jsonl", shared_passage["questions"])
    shutil.copy(corpus, inputs / "corpus.jsonl")
    planted = planted_copies(sample_path, inputs / "sample-planted.jsonl")
    write_jsonl(inputs / "shared-passage-copies.jsonl", [shared_passage["near"], shared_passage["exact"]])
    base = [f"tables.warehouse={root / 'warehouse'}"]
    # The real sample and the questions about one passage first, then (a later ingested_at) the
    # corpus and the planted copies.
    ingest.run(load_config("ingest", [*base, f"ingest.input={first}"]), spark)
    ingest.run(load_config("ingest", [*base, f"ingest.input={inputs}"]), spark)
    cfg = load_config("dedupe", base)
    summary = dedupe.run(cfg, spark)
    store = DeltaStore(spark, cfg.tables)
    return {"cfg": cfg, "base": base, "root": root, "store": store, "summary": summary,
            "corpus": corpus, "truth": truth, "planted": planted, "spark": spark,
            "shared_passage": shared_passage}


def table(world, name: str, version=None):
    return world["store"].read(getattr(world["cfg"].tables, name), version)


def duplicates_map(world) -> dict[str, tuple]:
    return {r["record_id"]: (r["cluster_id"], r["survivor_id"], r["kind"], r["similarity"])
            for r in table(world, "duplicates").collect()}


def test_corpus_accuracy(world):
    """All exact duplicates found, pair-level F1 >= 0.97, no two originals merged."""
    dups = duplicates_map(world)
    scores = score_records({rid: d[0] for rid, d in dups.items()}, line_record_ids(world["corpus"]),
                           read_truth(world["truth"]))
    assert scores.exact_found == scores.exact_total > 0
    assert scores.f1 >= 0.97, scores
    assert scores.merged_originals == 0, scores
    assert scores.precision >= 0.99, scores


def test_planted_copies_of_the_real_sample(world):
    """Copies ingested after their originals are removed in favour of the originals (earliest
    ingested_at wins even where a copy has the smaller record_id), with the right kind."""
    dups = duplicates_map(world)
    lines = world["planted"]
    originals = {line["_of"]: rid_of(line) for line in lines if line["_kind"] == "original"}
    for line in lines:
        rid = rid_of(line)
        if line["_kind"] == "original":
            assert rid not in dups, f"sample record {line['_of']} was removed"
            continue
        assert rid in dups, f"planted {line['_kind']} copy of sample record {line['_of']} not found"
        cluster, survivor, kind, sim = dups[rid]
        assert (cluster, survivor, kind) == (originals[line["_of"]], originals[line["_of"]], line["_kind"])
        assert sim == 1.0 if kind == "exact" else 0.7 <= sim <= 1.0


def test_different_questions_about_one_passage_all_survive(world):
    """Records sharing one long passage with different instructions and responses are all kept
    (a shared passage alone never makes a duplicate, nor chains one question to another), while
    a near copy of one of them (same passage) and an exact copy of another are removed."""
    dups = duplicates_map(world)
    sp = world["shared_passage"]
    for q in sp["questions"]:
        assert rid_of(q) not in dups, (q["instruction"], dups.get(rid_of(q)))
    original = rid_of(sp["questions"][1])
    cluster, survivor, kind, sim = dups[rid_of(sp["near"])]
    assert (cluster, survivor, kind) == (original, original, "near") and 0.7 <= sim < 1.0
    original = rid_of(sp["questions"][2])
    assert dups[rid_of(sp["exact"])] == (original, original, "exact", 1.0)
    assert sum(1 for d in dups.values() if d[0] in {rid_of(q) for q in sp["questions"]}) == 2


def test_outputs_partition_bronze_and_follow_the_survivor_rule(world):
    bronze = {r["record_id"]: r for r in table(world, "bronze").collect()}
    silver = table(world, "silver")
    assert silver.columns == table(world, "bronze").columns
    silver_ids = {r["record_id"] for r in silver.select("record_id").collect()}
    dups = duplicates_map(world)
    assert silver_ids.isdisjoint(dups) and silver_ids | set(dups) == set(bronze)
    members: dict[str, list[str]] = {}
    for rid, (cluster, survivor, kind, sim) in dups.items():
        assert cluster == survivor and survivor in silver_ids and kind in ("exact", "near")
        assert 0.0 <= sim <= 1.0 and (kind == "near" or sim == 1.0)
        members.setdefault(survivor, []).append(rid)
    for survivor, removed in members.items():
        order = sorted([survivor, *removed], key=lambda r: (bronze[r]["ingested_at"], r))
        assert order[0] == survivor
    s = world["summary"]
    assert s["input_rows"] == len(bronze) and s["survivors"] == len(silver_ids)
    assert s["removed_exact"] + s["removed_near"] == len(dups) and s["clusters"] == len(members)


def test_dedupe_runs_row(world):
    rows = table(world, "dedupe_runs").collect()
    assert len(rows) == 1
    row, s = rows[0], world["summary"]
    assert row["bronze_version"] == s["bronze_version"] == world["store"].version(world["cfg"].tables.bronze)
    for key in ("input_rows", "survivors", "removed_exact", "removed_near", "clusters", "silver_version",
                "duplicates_version"):
        assert row[key] == s[key]
    params = json.loads(row["parameters"])
    assert params["threshold"] == 0.7 and params["ngram"] == 2 and params["bands"] * params["rows"] <= 128


def test_rerun_on_unchanged_bronze_writes_nothing(world):
    from dollyflow.jobs import dedupe
    t = world["cfg"].tables
    store = world["store"]
    before = {n: store.version(getattr(t, n)) for n in ("silver", "duplicates", "dedupe_runs")}
    again = dedupe.run(load_config("dedupe", world["base"]), world["spark"])
    assert again["skipped"] is True
    assert {n: store.version(getattr(t, n)) for n in before} == before
    assert again["removed_near"] == world["summary"]["removed_near"]


def test_same_result_whatever_the_partitioning(world):
    """The same bronze version split into more input partitions (round-robin, so rows move) and
    deduplicated with another number of shuffle partitions, set on the running session with
    adaptive execution off so that it holds, gives exactly the job's duplicates and silver."""
    from dollyflow.engine.dedupe import DedupeParams, candidate_pairs, find_duplicates, silver_of
    spark, cfg = world["spark"], world["cfg"]
    params = DedupeParams.from_config(cfg.dedupe)
    bronze = world["store"].read(cfg.tables.bronze, world["summary"]["bronze_version"])
    inputs = bronze.rdd.getNumPartitions() + 3
    shuffle = int(spark.conf.get("spark.sql.shuffle.partitions")) + 3   # the job's run had at most
    settings = {"spark.sql.shuffle.partitions": str(shuffle),          # the session's (AQE only lowers it)
                "spark.sql.adaptive.enabled": "false"}
    old = {k: spark.conf.get(k) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        moved = bronze.repartition(inputs)
        frames = find_duplicates(moved, params, cfg.dedupe.max_cc_iterations)
        try:  # the settings took effect: signatures per input partition, candidates per shuffle one
            assert frames.signed.rdd.getNumPartitions() == inputs
            assert candidate_pairs(frames.signed, params.all_pairs_bucket).rdd.getNumPartitions() == shuffle
            dups = {r["record_id"]: (r["cluster_id"], r["survivor_id"], r["kind"], r["similarity"])
                    for r in frames.duplicates.collect()}
            silver = sorted(tuple(r) for r in silver_of(moved, frames.duplicates).collect())
        finally:
            frames.signed.unpersist()
    finally:
        for k, v in old.items():
            spark.conf.set(k, v)
    assert {k: spark.conf.get(k) for k in settings} == old
    assert dups == duplicates_map(world)
    assert silver == sorted(tuple(r) for r in table(world, "silver").collect())


def test_reads_bronze_at_the_recorded_version(world, tmp_path):
    """After more records reach bronze, dedupe.bronze_version=<old> still dedupes the old
    snapshot and records that version; the default reads the current one."""
    from dollyflow.jobs import dedupe, ingest
    t = world["cfg"].tables
    store = world["store"]
    old_version = store.version(t.bronze)
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"instruction": "A brand new question about zebras?", "context": "",
                                 "response": "Zebras are striped.", "category": "open_qa"}) + "\n")
    ingest.run(load_config("ingest", [*world["base"], f"ingest.input={extra}"]), world["spark"])
    assert store.version(t.bronze) == old_version + 1
    pinned = dedupe.run(load_config("dedupe", [*world["base"], f"dedupe.bronze_version={old_version}",
                                               "dedupe.skip_unchanged=false"]), world["spark"])
    assert pinned["bronze_version"] == old_version
    assert pinned["input_rows"] == world["summary"]["input_rows"]
    current = dedupe.run(load_config("dedupe", world["base"]), world["spark"])
    assert current["skipped"] is False and current["bronze_version"] == old_version + 1
    assert current["input_rows"] == world["summary"]["input_rows"] + 1
    assert current["survivors"] == world["summary"]["survivors"] + 1
    last = table(world, "dedupe_runs").orderBy("finished_at", ascending=False).first()
    assert last["bronze_version"] == old_version + 1


@pytest.mark.slow
def test_no_originals_merged_in_a_100k_line_corpus(spark, make_corpus, tmp_path):
    """The issue's bar at scale: 100,000 lines, every exact duplicate found, near duplicates
    (edit rate 0.03) at pair-level F1 >= 0.97, and no two distinct originals in one cluster."""
    from dollyflow.jobs import dedupe, ingest
    corpus, truth = make_corpus(100_000, edit_rate=0.03)
    base = [f"tables.warehouse={tmp_path / 'warehouse'}"]
    ingest.run(load_config("ingest", [*base, f"ingest.input={corpus}"]), spark)
    cfg = load_config("dedupe", base)
    dedupe.run(cfg, spark)
    from dollyflow.engine.delta import DeltaStore
    dups = DeltaStore(spark, cfg.tables).read(cfg.tables.duplicates).select("record_id", "cluster_id").collect()
    scores = score_records({r["record_id"]: r["cluster_id"] for r in dups}, line_record_ids(corpus),
                           read_truth(truth))
    assert scores.merged_originals == 0, scores
    assert scores.exact_found == scores.exact_total, scores
    assert scores.f1 >= 0.97, scores


def test_connected_components_on_dataframes(spark):
    """Chains, a long path, a star and a cycle each collapse to their smallest node."""
    import random as _random

    from dollyflow.engine.dedupe import connected_components
    edges = [(1, 2), (2, 3), (3, 4), (10, 11), (12, 11)]            # chains
    edges += [(100 + i, 101 + i) for i in range(30)]                 # a path of 31 nodes
    edges += [(200, 201), (201, 202), (202, 200)]                    # a cycle
    edges += [(300, 300 + i) for i in range(1, 6)]                   # a star
    _random.Random(0).shuffle(edges)
    pairs = spark.createDataFrame([(max(a, b), min(a, b)) if i % 2 else (a, b) for i, (a, b) in enumerate(edges)],
                                  "a long, b long")
    got = {r["node"]: r["component"] for r in connected_components(pairs).collect()}
    expected = {n: 1 for n in (1, 2, 3, 4)} | {n: 10 for n in (10, 11, 12)}
    expected |= {100 + i: 100 for i in range(31)} | {n: 200 for n in (200, 201, 202)}
    expected |= {300 + i: 300 for i in range(6)}
    assert got == expected


@pytest.mark.parametrize("fault", ["bronze_count", "lost_silver_row"])
def test_a_failed_count_check_commits_nothing(spark, sample_path, tmp_path, monkeypatch, fault):
    """The counts are checked on the written-but-uncommitted outputs: a mismatch (bronze's log
    disagreeing with the rows read, or a silver frame that loses a row) fails the run, silver and
    duplicates stay at their previous versions and content, and no staged file is left."""
    from dollyflow.core.counts import CountMismatch
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import dedupe, ingest

    records = [json.loads(line) for line in open(sample_path, encoding="utf-8")][:20]
    src = tmp_path / "in.jsonl"
    write_jsonl(src, records + [dict(records[0], instruction=records[0]["instruction"].upper())])
    base = [f"tables.warehouse={tmp_path / 'wh'}", "spark.shuffle_partitions=4"]
    ingest.run(load_config("ingest", [*base, f"ingest.input={src}"]), spark)
    first = dedupe.run(load_config("dedupe", base), spark)
    assert first["removed_exact"] == 1
    write_jsonl(src, [dict(r, instruction=r["instruction"] + " (new)") for r in records[:3]])
    ingest.run(load_config("ingest", [*base, f"ingest.input={src}"]), spark)
    store = DeltaStore(spark, load_config("dedupe", base).tables)
    tables = ("silver", "duplicates")
    before = {n: (store.version(n), sorted(map(tuple, store.read(n).collect()))) for n in tables}
    files = {n: sorted(p.name for p in Path(store.location(n)).iterdir()) for n in tables}
    if fault == "bronze_count":
        real = DeltaStore.count
        monkeypatch.setattr(DeltaStore, "count", lambda self, name, version=None:
                            real(self, name, version) + (name == "bronze"))
        match = r"dedupe: bronze v1: rows of .* = 25, but rows read by dedupe = 24"
    else:
        real_silver = dedupe.silver_of

        def lossy(bronze, dups):
            df = real_silver(bronze, dups)
            return df.filter(df.record_id != df.orderBy("record_id").first()["record_id"])

        monkeypatch.setattr(dedupe, "silver_of", lossy)   # as the job calls it
        match = (r"dedupe: outputs: bronze rows = 24, but rows of silver \(\d+\) \+ duplicates \(\d+\) as written, "
                 r"before their commits = 23 \(difference -1\)")
    with pytest.raises(CountMismatch, match=match):
        dedupe.run(load_config("dedupe", base), spark)
    assert {n: (store.version(n), sorted(map(tuple, store.read(n).collect()))) for n in tables} == before
    assert {n: sorted(p.name for p in Path(store.location(n)).iterdir()) for n in tables} == files
    assert not any((Path(store.location("silver")).parent / "_staging").glob("*"))
    assert store.count("dedupe_runs") == 1
