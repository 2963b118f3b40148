"""The tokenize job end to end on a small silver table (Spark, local[2])."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dollyflow.core.prompt import format_training_prompt
from dollyflow.core.records import record_id
from dollyflow.core.shards import ShardDataset, read_manifest, read_pointer, resolve_shard_dir, verify_shards
from dollyflow.core.split import assign_splits, split_key
from dollyflow.core.tokens import load_tokenizer

pytestmark = pytest.mark.spark

SILVER_DDL = ("record_id string, instruction string, context string, response string, category string, "
              "source_file string, source_line long, ingested_at timestamp, run_id string")
MAX_LENGTH = 512


def silver_rows(sample_path: Path) -> list[tuple]:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    for n, line in enumerate(open(sample_path, encoding="utf-8"), 1):
        r = json.loads(line)
        rid = record_id(r["instruction"], r.get("context") or "", r["response"], r["category"])
        rows.append((rid, r["instruction"], r.get("context") or "", r["response"], r["category"],
                     str(sample_path), n, now, "test"))
    # one prompt far over MAX_LENGTH tokens whatever the tokenizer: dropped as too_long
    long_text = " ".join(f"w{i}" for i in range(2 * MAX_LENGTH))
    rows.append(("e" * 16, "Repeat the words.", long_text, "Done.", "open_qa", "synthetic", 0, now, "test"))
    # one blank response: dropped as empty_response (always last)
    rows.append(("f" * 16, "Say nothing.", "", "   ", "open_qa", "synthetic", 0, now, "test"))
    return rows


@pytest.fixture(scope="module")
def job(spark, sample_path, tokenizer_path, tmp_path_factory):
    """One silver table (the sample, written as dedupe would) and one tokenize run over it."""
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import tokenize

    root = tmp_path_factory.mktemp("tokenize")
    cfg = load_config("tokenize", ["tokenize.source_table=silver", f"tables.warehouse={root / 'warehouse'}", "spark.shuffle_partitions=4",
                                   f"tokenize.tokenizer={tokenizer_path}", f"tokenize.max_length={MAX_LENGTH}",
                                   "tokenize.test_size=10", "tokenize.num_shards=3"])
    store = DeltaStore(spark, cfg.tables)
    rows = silver_rows(sample_path)
    silver_version = store.write(spark.createDataFrame(rows, SILVER_DDL).repartition(3), cfg.tables.silver,
                                 mode="overwrite", job="test", run_id="test")
    summary = tokenize.run(cfg, spark)
    return {"cfg": cfg, "store": store, "rows": rows, "summary": summary, "silver_version": silver_version,
            "tokenizer_path": tokenizer_path}


def test_summary_counts_splits_and_drops(job):
    s = job["summary"]
    tok = load_tokenizer(job["tokenizer_path"])
    rows = job["rows"]
    lengths = [len(tok(format_training_prompt(r[1], r[3], r[2]))["input_ids"]) for r in rows[:-1]]
    too_long = sum(n > MAX_LENGTH for n in lengths)
    assert too_long > 0
    assert s["drops"] == {"too_long": too_long, "empty_response": 1}
    assert s["records"] == {"test": 10, "train": len(rows) - 1 - too_long - 10}
    assert s["records_in"] == s["silver_rows"] == len(rows)          # measured from silver's log
    assert s["records_tokenized"] + s["records_dropped"] == len(rows)
    assert s["backend_reason"] and s["skipped"] is False
    assert s["silver_version"] == job["silver_version"]
    assert s["shard_dir"] == f"{s['shards_root']}/v{job['silver_version']}-{job['cfg'].run_id}"
    assert s["shards_root"].endswith("warehouse/shards/silver")
    json.dumps(s)


def test_table_matches_core_encoding_and_split(job):
    store, cfg = job["store"], job["cfg"]
    table = {r["record_id"]: r for r in store.read(cfg.tables.tokenized).collect()}
    tok = load_tokenizer(job["tokenizer_path"])
    kept = []
    for r in job["rows"][:-1]:
        ids = tok(format_training_prompt(r[1], r[3], r[2]))["input_ids"]
        if len(ids) > MAX_LENGTH:
            assert r[0] not in table
            continue
        kept.append(r[0])
        got = table[r[0]]
        assert list(got["input_ids"]) == ids
        assert got["length"] == len(ids)
        assert ids[got["response_start"] - 1] == tok.convert_tokens_to_ids("### Response:\n")
        assert got["category"] == r[4]
    assert set(table) == set(kept)
    expected = dict(zip(kept, assign_splits(kept, 10, seed=42)))
    assert {k: v["split"] for k, v in table.items()} == expected


def test_manifest_matches_shards(job):
    d = Path(job["summary"]["shard_dir"])
    m = read_manifest(d)
    assert verify_shards(d) == []
    assert m["source"]["version"] == job["silver_version"] and m["source"]["table"] == "silver"
    assert m["max_length"] == MAX_LENGTH and m["drops"] == job["summary"]["drops"]
    files = sorted(p.name for p in d.glob("*.parquet"))
    assert files == sorted(e["file"] for s in m["splits"].values() for e in s["shards"])
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["tokenizer"]     # staging files removed
    assert len(m["splits"]["train"]["shards"]) == 3 and len(m["splits"]["test"]["shards"]) == 3
    for split, s in m["splits"].items():
        tables = [pq.read_table(d / e["file"]) for e in s["shards"]]
        assert sum(t.num_rows for t in tables) == s["records"] == job["summary"]["records"][split]
        tokens = [sum(t.column("length").to_pylist()) for t in tables]
        assert sum(tokens) == s["tokens"]
        assert max(abs(t - sum(tokens) / len(tokens)) for t in tokens) <= MAX_LENGTH   # balanced by tokens
        keys = [(split_key(r), r) for t in tables for r in t.column("record_id").to_pylist()]
        assert keys == sorted(keys)        # shard i holds a range of split keys, below shard i+1's
        cats = {}
        for t in tables:
            for c in t.column("category").to_pylist():
                cats[c] = cats.get(c, 0) + 1
        assert {c: v["records"] for c, v in s["categories"].items()} == cats
        assert sum(s["length_histogram"]["counts"]) == s["records"]
    # the trainer needs only the directory: dataset + the saved tokenizer
    tok = load_tokenizer(d / "tokenizer", dolly_tokens=False)
    assert tok.pad_token == tok.eos_token
    assert m["tokenizer"]["special_token_ids"]["### Response:\n"] == tok.convert_tokens_to_ids("### Response:\n")
    ds = ShardDataset(d, "test")
    assert len(ds) == 10 == len(list(ds))
    ex = ds[0]
    start = ex["labels"].tolist().count(-100)
    assert ex["input_ids"][start - 1] == tok.convert_tokens_to_ids("### Response:\n")
    assert tok.decode(ex["input_ids"][start:]).endswith("### End")


def test_staged_rows_read_back_as_each_shard(job, spark, tmp_path):
    """Five tokenize tasks, each writing one sorted staging file: the plan's row ranges of every
    shard, read back from all five files, are exactly the job's shard, in split-key order; a
    staging file out of order is refused."""
    import numpy as np
    import pyarrow as pa

    from dollyflow.engine.tokenize import plan_outputs, read_pieces, staging_name, tokenize_to_staging

    d = Path(job["summary"]["shard_dir"])
    text = (d / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8")
    silver = job["store"].read(job["cfg"].tables.silver).repartition(5, "record_id")   # deterministic
    narrow = tokenize_to_staging(silver, text, MAX_LENGTH, 42, str(tmp_path / "staging")).toArrow()
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == [staging_name(i << 16) for i in range(5)]
    counts = plan_outputs(narrow, 10, 3)
    assert counts.drops == job["summary"]["drops"] and counts.split_records == job["summary"]["records"]
    readers, spans = {}, []
    for split, n in counts.shard_counts.items():
        for i in range(n):
            pieces = counts.pieces[(split, i)]
            assert len({part for part, _, _ in pieces}) == len(pieces)      # one row range per file
            spans.append(len(pieces))
            got = read_pieces(str(tmp_path / "staging"), pieces, readers)
            shard = pq.read_table(d / f"{split}-{i:05d}-of-{n:05d}.parquet")
            assert got.column("record_id").to_pylist() == shard.column("record_id").to_pylist()
            assert got.column("length").to_pylist() == shard.column("length").to_pylist()
    assert max(spans) > 1                                                   # shards do span files
    # a file whose rows are not in (split_key, record_id) order cannot be cut into shard ranges
    shuffled = narrow.filter(pa.compute.is_valid(narrow.column("part")))
    rows = shuffled.column("row").to_numpy().copy()
    first = np.flatnonzero(shuffled.column("part").to_numpy() == shuffled.column("part")[0].as_py())
    lo, hi = first[np.argmin(rows[first])], first[np.argmax(rows[first])]
    rows[lo], rows[hi] = rows[hi], rows[lo]          # the file's first and last record swap places
    bad = shuffled.set_column(shuffled.schema.get_field_index("row"), "row", pa.array(rows, type=pa.int32()))
    with pytest.raises(RuntimeError, match="is not in \\(split_key, record_id\\) order"):
        plan_outputs(bad, 10, 3)


def test_rerun_with_other_partitioning_is_identical(job, spark, tmp_path):
    """Same silver, another partitioning and another output dir: same table content, same shards."""
    from dollyflow.config import load_config
    from dollyflow.jobs import tokenize

    cfg = job["cfg"]
    out = tmp_path / "shards2"
    cfg2 = load_config("tokenize", ["tokenize.source_table=silver", f"tables.warehouse={cfg.tables.warehouse}", "spark.shuffle_partitions=7",
                                    f"tokenize.tokenizer={job['tokenizer_path']}",
                                    f"tokenize.max_length={MAX_LENGTH}", "tokenize.test_size=10",
                                    "tokenize.num_shards=3", f"tokenize.output_dir={out}"])
    before = {r["record_id"]: (r["split"], list(r["input_ids"]))
              for r in job["store"].read(cfg.tables.tokenized).collect()}
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "7")
    try:
        s2 = tokenize.run(cfg2, spark)
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    after = {r["record_id"]: (r["split"], list(r["input_ids"]))
             for r in job["store"].read(cfg.tables.tokenized).collect()}
    assert after == before
    m1, m2 = read_manifest(job["summary"]["shard_dir"]), read_manifest(resolve_shard_dir(str(out)))
    assert s2["shard_dir"] == resolve_shard_dir(str(out))
    assert [e["sha256"] for s in m1["splits"].values() for e in s["shards"]] == \
           [e["sha256"] for s in m2["splits"].values() for e in s["shards"]]
    assert m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]
    assert s2["drops"] == job["summary"]["drops"]


def test_mds_requested_without_streaming_fails_before_any_work(job, spark, tmp_path, monkeypatch):
    """tokenize.mds=true where mosaicml-streaming cannot be imported: a clear error, and nothing
    written (no shard directory, no new tokenized version)."""
    from dollyflow.jobs import tokenize

    monkeypatch.setattr(tokenize, "mds_available", lambda: False)
    before = job["store"].version(job["cfg"].tables.tokenized)
    with pytest.raises(RuntimeError, match="mosaicml-streaming"):
        tokenize.run(_cfg(job, f"tokenize.output_dir={tmp_path / 'mds'}", "tokenize.mds=true"), spark)
    assert not (tmp_path / "mds").exists()
    assert job["store"].version(job["cfg"].tables.tokenized) == before


def test_mds_export_writes_every_split(job, spark, tmp_path):
    """With mosaicml-streaming installed: both splits exported and readable record for record."""
    streaming = pytest.importorskip("streaming", reason="mosaicml-streaming is not installable here")
    from dollyflow.jobs import tokenize

    s = tokenize.run(_cfg(job, f"tokenize.output_dir={tmp_path / 'mds'}", "tokenize.mds=true"), spark)
    assert set(s["mds"]) == {"train", "test"}
    for split, path in s["mds"].items():
        got = sorted(r["record_id"] for r in streaming.LocalDataset(local=path))
        assert got == sorted(e["record_id"] for e in ShardDataset(s["shard_dir"], split))


def test_tokenizer_is_built_once_per_worker_not_per_batch(job, spark):
    """Many small Arrow batches over several tasks: each Python worker builds the tokenizer once."""
    import pyarrow as pa

    from dollyflow.core.tokens import backend_builds
    from dollyflow.engine.tokenize import TOKENIZED_ARROW, TOKENIZED_DDL, encoder

    text = (Path(job["summary"]["shard_dir"]) / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8")
    encode = encoder(text, MAX_LENGTH, 42)

    def encode_and_report(batches):
        """The job's encoder, then one extra row carrying (pid, tokenizers built by this task) of this
        worker (a delta: a reused worker may hold tokenizers of earlier tests in the session)."""
        import os
        before = backend_builds()
        yield from encode(batches)
        yield pa.RecordBatch.from_pylist([{"record_id": "__report__", "split_key": os.getpid(),
                                           "length": backend_builds() - before}], schema=TOKENIZED_ARROW)

    silver = job["store"].read(job["cfg"].tables.silver).repartition(6)
    cols = ["record_id", "instruction", "context", "response", "category"]
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "5")
    try:
        rows = silver.select(*cols).mapInArrow(encode_and_report, TOKENIZED_DDL).collect()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    reports = [r for r in rows if r["record_id"] == "__report__"]
    assert len(rows) - len(reports) == len(job["rows"]) and len(reports) == 6
    # 6 tasks of ~17 records in batches of 5: loading per batch would count 4 a task, per task 1 a
    # task; once per worker is at most 1 over all the tasks a worker ran
    per_worker: dict = {}
    for r in reports:
        per_worker[r["split_key"]] = per_worker.get(r["split_key"], 0) + r["length"]
    assert all(n <= 1 for n in per_worker.values()), reports


def test_spark_submit_script_runs_despite_its_stdlib_name():
    """jobs/tokenize.py shares its name with the stdlib ``tokenize``; it must still start."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "jobs" / "tokenize.py"), "--help"], cwd=repo / "jobs",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dollyflow tokenize" in out.stdout


def _cfg(job, *overrides):
    from dollyflow.config import load_config
    return load_config("tokenize", ["tokenize.source_table=silver", f"tables.warehouse={job['cfg'].tables.warehouse}",
                                    f"tokenize.tokenizer={job['tokenizer_path']}", f"tokenize.max_length={MAX_LENGTH}",
                                    "tokenize.test_size=10", "tokenize.num_shards=2", *overrides])


def test_each_run_writes_a_new_version_and_moves_the_pointer_only_when_verified(job, spark, tmp_path, monkeypatch):
    """Run 1 -> v.../ + pointer; run 2 fails verification -> pointer and run 1's shards untouched,
    run 2's directory gone; run 3 succeeds with keep_versions=1 -> pointer moves, run 1 pruned."""
    import dollyflow.engine.tokenize as engine_tokenize
    from dollyflow.jobs import tokenize

    root = tmp_path / "root"
    s1 = tokenize.run(_cfg(job, f"tokenize.output_dir={root}"), spark)
    assert read_pointer(str(root))["dir"] == Path(s1["shard_dir"]).name
    assert resolve_shard_dir(str(root)) == s1["shard_dir"]

    real_verify = engine_tokenize.verify_shards
    monkeypatch.setattr(engine_tokenize, "verify_shards", lambda d: real_verify(d) + ["train-00000: injected mismatch"])
    cfg2 = _cfg(job, f"tokenize.output_dir={root}", "tokenize.skip_unchanged=false")
    with pytest.raises(RuntimeError, match="injected mismatch"):
        tokenize.run(cfg2, spark)
    monkeypatch.setattr(engine_tokenize, "verify_shards", real_verify)
    assert resolve_shard_dir(str(root)) == s1["shard_dir"] and verify_shards(s1["shard_dir"]) == []
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["LATEST.json", Path(s1["shard_dir"]).name]

    s3 = tokenize.run(_cfg(job, f"tokenize.output_dir={root}", "tokenize.keep_versions=1",
                           "tokenize.skip_unchanged=false"), spark)
    assert resolve_shard_dir(str(root)) == s3["shard_dir"] != s1["shard_dir"]
    assert s3["pruned"] == [Path(s1["shard_dir"]).name]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["LATEST.json", Path(s3["shard_dir"]).name]
    runs = job["store"].read(job["cfg"].tables.tokenize_runs).collect()
    mine = {r["run_id"]: r for r in runs}
    assert set(mine) >= {s1["run_id"], s3["run_id"]} and cfg2.run_id not in mine   # the failed run left no row
    assert mine[s3["run_id"]]["shard_dir"] == s3["shard_dir"]
    assert mine[s3["run_id"]]["manifest_sha256"] == s3["manifest_sha256"]


def test_shards_on_an_object_store(job, spark, s3_bucket):
    """s3a:// shards root on a real S3 endpoint: executors write the shards there, the job verifies
    them, the pointer lands there, and the trainer's reader reads the same records as locally."""
    from dollyflow.jobs import tokenize

    root = s3_bucket("s3a", "job-shards")
    s = tokenize.run(_cfg(job, f"tokenize.output_dir={root}", "tokenize.num_shards=3"), spark)
    assert s["shard_dir"].startswith("s3a://") and resolve_shard_dir(root) == s["shard_dir"]
    assert verify_shards(s["shard_dir"]) == []
    local = job["summary"]["shard_dir"]
    for split in ("train", "test"):
        assert sorted(e["record_id"] for e in ShardDataset(s["shard_dir"], split)) == \
               sorted(e["record_id"] for e in ShardDataset(local, split))


def test_local_output_is_refused_on_a_multi_host_master(job, spark, monkeypatch):
    """A driver-local shards root with executors on other hosts fails before any work."""
    from dollyflow.jobs import tokenize

    monkeypatch.setattr(tokenize, "master_of", lambda _spark: "yarn")
    with pytest.raises(ValueError, match="executors on other hosts"):
        tokenize.run(_cfg(job), spark)


def test_rerun_with_unchanged_inputs_writes_nothing(job, spark, tmp_path):
    """Same silver version and settings: skipped, no new shard version, no tokenized overwrite,
    no run row; a changed setting (num_shards) or skip_unchanged=false builds again."""
    from dollyflow.jobs import tokenize

    store, t = job["store"], job["cfg"].tables
    root = tmp_path / "root"
    s1 = tokenize.run(_cfg(job, f"tokenize.output_dir={root}"), spark)
    runs = store.read(t.tokenize_runs).count()
    v_table = store.version(t.tokenized)
    s2 = tokenize.run(_cfg(job, f"tokenize.output_dir={root}"), spark)
    assert s2["skipped"] is True and s2["previous_run_id"] == s1["run_id"]
    assert s2["shard_dir"] == s1["shard_dir"] and s2["records"] == s1["records"]
    assert s2["tokenized_version"] == s1["tokenized_version"] == store.version(t.tokenized) == v_table
    assert store.read(t.tokenize_runs).count() == runs
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["LATEST.json", Path(s1["shard_dir"]).name]
    s3 = tokenize.run(_cfg(job, f"tokenize.output_dir={root}", "tokenize.num_shards=3"), spark)
    assert s3["skipped"] is False and s3["shard_dir"] != s1["shard_dir"] and s3["shards"]["train"] == 3
    s4 = tokenize.run(_cfg(job, f"tokenize.output_dir={root}", "tokenize.num_shards=3",
                           "tokenize.skip_unchanged=false"), spark)
    assert s4["skipped"] is False and s4["tokenized_version"] == s3["tokenized_version"] + 1


def test_silver_rows_that_do_not_add_up_fail_before_anything_is_written(job, spark, tmp_path, monkeypatch):
    """silver's row count (from its Delta log) must equal tokenized + dropped; a mismatch stops
    the run before any shard, table version or pointer is written."""
    from dollyflow.core.counts import CountMismatch
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import tokenize

    real_count = DeltaStore.count
    monkeypatch.setattr(DeltaStore, "count", lambda self, name, version=None: real_count(self, name, version) + 1)
    before = job["store"].version(job["cfg"].tables.tokenized)
    n = len(job["rows"])
    with pytest.raises(CountMismatch, match=rf"silver v\d+: rows of .* = {n + 1}, but rows tokenized .* = {n} "):
        tokenize.run(_cfg(job, f"tokenize.output_dir={tmp_path / 'r'}"), spark)
    assert job["store"].version(job["cfg"].tables.tokenized) == before
    assert not any((tmp_path / "r").glob("v*")) and not (tmp_path / "r" / "LATEST.json").exists()


def test_shards_missing_a_record_fail_the_run(job, spark, tmp_path, monkeypatch):
    """If the shard writers lose a record, the per-split counts disagree with the split: the
    run fails, its table files are discarded and its shard directory removed."""
    import dollyflow.engine.tokenize as engine
    from dollyflow.core.counts import CountMismatch
    from dollyflow.jobs import tokenize

    real = engine.write_outputs

    def lossy(spark, counts, *args, **kwargs):
        key = ("train", counts.shard_counts["train"] - 1)      # one record of the last train shard
        part, lo, hi = counts.pieces[key][-1]
        counts.pieces[key][-1] = (part, lo, hi - 1)
        return real(spark, counts, *args, **kwargs)

    monkeypatch.setattr(engine, "write_outputs", lossy)
    store, t = job["store"], job["cfg"].tables
    before = store.version(t.tokenized)
    table_dir = Path(store.location(t.tokenized))
    folders = sorted(p.name for p in table_dir.iterdir())
    with pytest.raises(CountMismatch, match=r"records per split \[train\]: the split = (\d+), but the shards written"):
        tokenize.run(_cfg(job, f"tokenize.output_dir={tmp_path / 'r'}", "tokenize.skip_unchanged=false"), spark)
    assert store.version(t.tokenized) == before
    assert not any((tmp_path / "r").glob("v*"))
    assert sorted(p.name for p in table_dir.iterdir()) == folders      # the run's table files are gone



@pytest.mark.parametrize("case", ["empty", "all-dropped"])
def test_no_record_to_tokenize_says_so_and_writes_nothing(job, spark, sample_path, tmp_path, case):
    """A silver version with no rows, or whose every record is dropped: a clear error naming
    silver's location, version and the drops, and the shards, their pointer and the tokenized
    table of the previous run stay current."""
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.engine.tokenize import NoRecordsToTokenize
    from dollyflow.jobs import tokenize

    wh, root = tmp_path / "wh", tmp_path / "root"

    def cfg(*more):
        return load_config("tokenize", ["tokenize.source_table=silver", f"tables.warehouse={wh}", f"tokenize.tokenizer={job['tokenizer_path']}",
                                        f"tokenize.output_dir={root}", "tokenize.test_size=2",
                                        "tokenize.num_shards=1", *more])

    store = DeltaStore(spark, cfg().tables)
    store.write(spark.createDataFrame(silver_rows(sample_path)[:10], SILVER_DDL), "silver", mode="overwrite")
    first = tokenize.run(cfg(f"tokenize.max_length={MAX_LENGTH}"), spark)
    pointer, versions = read_pointer(str(root)), sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    tokenized = store.version("tokenized")
    if case == "empty":
        v = store.write(spark.createDataFrame([], SILVER_DDL), "silver", mode="overwrite")
        expected = rf"no record to tokenize: silver {wh}/dollyflow/silver v{v} has no rows; nothing was written"
        more = [f"tokenize.max_length={MAX_LENGTH}"]
    else:
        v = store.version("silver")
        expected = (rf"no record to tokenize: silver {wh}/dollyflow/silver v{v} has 10 rows and every one was "
                    r"dropped \(too_long 10\); nothing was written")
        more = ["tokenize.max_length=4", "tokenize.skip_unchanged=false"]
    with pytest.raises(NoRecordsToTokenize, match=expected):
        tokenize.run(cfg(*more), spark)
    assert read_pointer(str(root)) == pointer and resolve_shard_dir(str(root)) == first["shard_dir"]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == versions and verify_shards(first["shard_dir"]) == []
    assert store.version("tokenized") == tokenized
    assert store.count("tokenize_runs") == 1


def test_a_run_over_an_older_silver_version_finishing_last_leaves_the_pointer(job, spark, sample_path, tmp_path):
    """Out of order: the run over silver v1 finished first; the run over v0 finishing after it
    keeps its complete shards but leaves the pointer at v1, says its shards are not the current
    ones, and its pruning (keep_versions=1) spares the directory the pointer names."""
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import tokenize

    wh, root = tmp_path / "wh", tmp_path / "root"

    def cfg(*more):
        return load_config("tokenize", ["tokenize.source_table=silver", f"tables.warehouse={wh}", f"tokenize.tokenizer={job['tokenizer_path']}",
                                        f"tokenize.output_dir={root}", f"tokenize.max_length={MAX_LENGTH}",
                                        "tokenize.test_size=2", "tokenize.num_shards=1", "tokenize.keep_versions=1",
                                        *more])

    store = DeltaStore(spark, cfg().tables)
    rows = silver_rows(sample_path)
    assert store.write(spark.createDataFrame(rows[:10], SILVER_DDL), "silver", mode="overwrite") == 0
    assert store.write(spark.createDataFrame(rows[:12], SILVER_DDL), "silver", mode="overwrite") == 1
    newer = tokenize.run(cfg("tokenize.silver_version=1"), spark)
    assert newer["shards_current"] is True and read_pointer(str(root))["silver_version"] == 1
    older = tokenize.run(cfg("tokenize.silver_version=0"), spark)
    assert older["shards_current"] is False
    assert older["current_shard_dir"] == newer["shard_dir"] and older["current_silver_version"] == 1
    assert "these shards are not the current ones" in older["not_current"] and "silver v1" in older["not_current"]
    assert read_pointer(str(root))["dir"] == Path(newer["shard_dir"]).name
    assert resolve_shard_dir(str(root)) == newer["shard_dir"]
    assert verify_shards(newer["shard_dir"]) == [] and verify_shards(older["shard_dir"]) == []
    assert older["pruned"] == []


def test_the_builder_without_spark_writes_the_jobs_shards(job, tmp_path):
    """core/shards/build.py (a GPU box without Spark, the benches) and the Spark job write the
    same records, in the same shards, in the same order, with the same per-shard stats."""
    from dollyflow.core.shards.build import build_shard_dir

    s, cfg = job["summary"], job["cfg"]
    records = [{"instruction": r[1], "context": r[2], "response": r[3], "category": r[4]} for r in job["rows"]]
    local = tmp_path / "local"
    built = build_shard_dir(records, job["tokenizer_path"], local, max_length=MAX_LENGTH,
                            test_size=cfg.tokenize.test_size, num_shards=cfg.tokenize.num_shards, seed=cfg.tokenize.seed)
    made = read_manifest(s["shard_dir"])
    assert built["drops"] == made["drops"] == s["drops"]
    for split in ("train", "test"):
        ours, theirs = built["splits"][split], made["splits"][split]
        for key in ("records", "tokens", "label_tokens", "categories", "length_histogram"):
            assert ours[key] == theirs[key], (split, key)
        assert [(a["file"], a["records"], a["tokens"]) for a in ours["shards"]] == \
            [(b["file"], b["records"], b["tokens"]) for b in theirs["shards"]] and ours["shards"]
        for a in ours["shards"]:
            ta, tb = pq.read_table(local / a["file"]), pq.read_table(Path(s["shard_dir"]) / a["file"])
            for column in ("record_id", "category", "input_ids", "response_start", "length"):
                assert ta.column(column).to_pylist() == tb.column(column).to_pylist(), (a["file"], column)
