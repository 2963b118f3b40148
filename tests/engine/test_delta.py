"""The Delta store on both backends: every test runs once on a session without Delta's jars
(offline: Spark's Parquet writer and delta-rs) and once on a session with them (native: Delta
Lake in the JVM); then tables written by one backend are read by the other."""
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from dollyflow.config import ConfigError
from dollyflow.engine.delta import DeltaStore, resolve

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module", params=["offline", "native"])
def backend(request, spark_of):
    """The backend under test; its session is started (or kept) for the whole group of its tests."""
    spark_of(delta=request.param == "native")
    return request.param


@pytest.fixture
def spark(backend, spark_of):
    """The session of the backend under test (the offline one has no Delta jars)."""
    return spark_of(delta=backend == "native")


@pytest.fixture
def store(spark, tmp_config, backend):
    s = DeltaStore(spark, tmp_config("test", f"tables.backend={backend}").tables)
    assert s.backend == backend
    return s


def rows(spark, start, end, tag="a"):
    return spark.range(start, end, 1, 3).selectExpr(
        "cast(id as string) as k", "id as v", f"'{tag}' as tag", "array(cast(id as int)) as ids",
        "timestamp'2024-01-01 00:00:00' as ts")


def keyed(df):
    return sorted((r["k"], r["v"], r["tag"]) for r in df.collect())


def test_round_trip_append_overwrite_and_versions(spark, store):
    assert not store.exists("t") and store.version("t") is None
    assert store.write(rows(spark, 0, 10), "t", job="j1", run_id="r1") == 0
    back = store.read("t")
    assert keyed(back) == keyed(rows(spark, 0, 10))
    assert dict(back.dtypes) == {"k": "string", "v": "bigint", "tag": "string", "ids": "array<int>",
                                 "ts": "timestamp"}
    assert store.write(rows(spark, 10, 15), "t", job="j2", run_id="r2") == 1
    assert store.read("t").count() == 15
    assert store.write(rows(spark, 100, 102), "t", mode="overwrite", job="j3", run_id="r3") == 2
    assert keyed(store.read("t")) == keyed(rows(spark, 100, 102))
    # time travel
    assert store.read("t", version=0).count() == 10
    assert store.read("t", version=1).count() == 15


def test_merge_upserts(spark, store):
    store.write(rows(spark, 0, 10), "m", job="seed", run_id="r0")
    upd = rows(spark, 5, 15, tag="b")
    v = store.merge(upd, "m", keys=["k"], job="merge-job", run_id="r1")
    assert v == 1
    got = {r["k"]: r["tag"] for r in store.read("m").collect()}
    assert len(got) == 15
    assert [got[str(i)] for i in range(15)] == ["a"] * 5 + ["b"] * 10
    # insert-only merge leaves matched rows alone
    store.merge(rows(spark, 0, 20, tag="c"), "m", keys=["k"], update=False)
    got = {r["k"]: r["tag"] for r in store.read("m").collect()}
    assert len(got) == 20 and got["0"] == "a" and got["19"] == "c"


def test_history_names_job_and_run(spark, store):
    store.write(rows(spark, 0, 3), "h", job="ingest", run_id="run-1")
    store.merge(rows(spark, 2, 4), "h", keys=["k"], job="dedupe", run_id="run-2")
    h = store.history("h")
    assert [x["version"] for x in h] == [1, 0]
    assert (h[0]["job"], h[0]["run_id"]) == ("dedupe", "run-2")
    assert (h[1]["job"], h[1]["run_id"]) == ("ingest", "run-1")


def test_table_is_real_delta(spark, store):
    deltalake = pytest.importorskip("deltalake")
    store.write(rows(spark, 0, 7), "real", job="j", run_id="r")
    if store.backend == "offline":
        dt = deltalake.DeltaTable(store.location("real"))
        assert dt.version() == 0
        assert dt.to_pyarrow_table().num_rows == 7
        assert sorted(dt.to_pyarrow_table().column("k").to_pylist()) == sorted(str(i) for i in range(7))
    # and Spark can read it through the registered `delta` format
    assert spark.read.format("delta").load(store.location("real")).count() == 7


def test_concurrent_appends_both_land(spark, store):
    store.write(rows(spark, 0, 1), "c", job="seed", run_id="r0")
    errors = []

    def append(lo):
        try:
            store.write(rows(spark, lo, lo + 50), "c", job="writer", run_id=f"r{lo}")
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(lo,)) for lo in (1000, 2000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.read("c").count() == 101
    assert store.version("c") == 2


def test_failed_write_leaves_previous_version(spark, store, tmp_path):
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType

    store.write(rows(spark, 0, 10), "f", job="seed", run_id="r0")

    @F.udf(LongType())
    def explode_on_7(v):
        if v == 7:
            raise RuntimeError("boom at 7")
        return v

    bad = rows(spark, 0, 30).withColumn("v", explode_on_7("v"))
    with pytest.raises(Exception, match="boom at 7"):
        store.write(bad, "f", job="broken", run_id="r1")
    assert store.version("f") == 0
    assert store.read("f").count() == 10
    if store.backend == "offline":  # aborted tasks' files are deleted, not left as litter
        from pathlib import Path

        import deltalake
        live = {Path(u.replace("file://", "")).resolve()
                for u in deltalake.DeltaTable(store.location("f")).file_uris()}
        on_disk = {p.resolve() for p in Path(store.location("f")).rglob("*.parquet")}
        assert on_disk == live and len(live) >= 1


def test_names_must_be_identifiers(store, tmp_config):
    with pytest.raises(ConfigError):
        store.read("bronze; DROP TABLE x")
    cfg = tmp_config("", "tables.catalog=main", "tables.schema=dolly")
    assert resolve(cfg.tables, "silver").fqn == "main.dolly.silver"


def test_sql_through_temp_view(spark, store):
    store.write(rows(spark, 0, 5), "sq", job="j", run_id="r")
    name = store.view("sq")
    assert spark.sql(f"SELECT sum(v) AS s FROM {name}").first()["s"] == 10


def test_write_returns_its_own_commit_when_another_writer_commits_right_after(spark, store, monkeypatch):
    """Another writer commits between our commit and anything we might read afterwards: the
    version and rows we get are still our commit's, not the latest."""
    from dollyflow.engine.delta import native, offline

    store.write(rows(spark, 0, 5), "own", job="seed", run_id="r0")
    path = store.location("own")

    def someone_else():
        import deltalake
        import pyarrow as pa
        deltalake.write_deltalake(path, pa.table({"k": ["x"], "v": [1], "tag": ["other"],
                                                  "ids": pa.array([[1]], pa.list_(pa.int32())),
                                                  "ts": pa.array([0], pa.timestamp("us", tz="UTC"))}),
                                  mode="append", commit_properties=deltalake.CommitProperties(
                                      custom_metadata={"run_id": "other"}))

    if store.backend == "offline":
        real_commit = offline.commit_files

        def commit_then_someone_else(p, schema, files, overwrite, options, evolve=False):
            real_commit(p, schema, files, overwrite, options, evolve)
            if p == path and options.get("run_id") == "mine":
                someone_else()

        monkeypatch.setattr(offline, "commit_files", commit_then_someone_else)
    else:
        real_find = native.NativeBackend._commit

        def someone_else_then_find(self, ref, write_id):
            someone_else()
            return real_find(self, ref, write_id)

        monkeypatch.setattr(native.NativeBackend, "_commit", someone_else_then_find)
    c = store.write(rows(spark, 10, 17), "own", job="mine-job", run_id="mine")
    assert (c.version, c.rows, c.committed) == (1, 7, True) and c == 1
    assert store.version("own") == 2
    assert {h["version"]: h["run_id"] for h in store.history("own")}[c.version] == "mine"


def test_concurrent_insert_only_merges_insert_each_key_once(spark, store, monkeypatch):
    """Two insert-only merges of overlapping keys, both prepared against the same version and
    released together: each key lands once, each call reports its own commit and what it
    inserted, and together they inserted every new key exactly once."""
    store.write(rows(spark, 0, 10), "ins", job="seed", run_id="r0")
    base = store.version("ins")
    if store.backend == "offline":   # natively our own merges are serialised (their commit metadata is session state)
        barrier = threading.Barrier(2, timeout=60)
        from dollyflow.engine.delta import offline
        real = offline.append_if_unchanged

        def together(*args, **kwargs):
            barrier.wait()
            return real(*args, **kwargs)

        monkeypatch.setattr(offline, "append_if_unchanged", together)
    out, errors = {}, []

    def merge(lo, hi, tag):
        try:
            out[tag] = store.merge(rows(spark, lo, hi, tag=tag), "ins", keys=["k"], update=False, absent_at=base,
                                   job="m", run_id=tag)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=merge, args=a) for a in ((10, 60, "p"), (40, 90, "q"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    keys = [r["k"] for r in store.read("ins").collect()]
    assert len(keys) == len(set(keys)) == 90
    p, q = out["p"], out["q"]
    assert {p.version, q.version} == {base + 1, base + 2}
    assert p.inserted + q.inserted == 80 and sorted([p.inserted, q.inserted]) == [30, 50]
    history = {h["version"]: h["run_id"] for h in store.history("ins")}
    assert history[p.version] == "p" and history[q.version] == "q"
    later = p if p.version > q.version else q
    assert later.read_version == base + 1 and later.operation == "MERGE"


def test_empty_insert_only_merge_commits_nothing(spark, store):
    store.write(rows(spark, 0, 3), "e", job="seed", run_id="r0")
    c = store.merge(rows(spark, 0, 3).limit(0), "e", keys=["k"], update=False, absent_at=0)
    assert not c.committed and c.version == 0 == store.version("e")


def test_count_is_measured_from_the_version(spark, store):
    store.write(rows(spark, 0, 12), "n", job="a", run_id="r")
    store.write(rows(spark, 12, 20), "n", job="a", run_id="r")
    assert store.count("n", 0) == 12 and store.count("n") == 20


def test_new_columns_need_evolve_schema(spark, store):
    store.write(rows(spark, 0, 2), "ev", job="a", run_id="r")
    wider = rows(spark, 2, 4).selectExpr("*", "'x' as extra")
    with pytest.raises(ValueError, match="extra"):
        store.write(wider, "ev", job="a", run_id="r")
    store.write(wider, "ev", job="a", run_id="r", evolve_schema=True)
    got = {r["k"]: r["extra"] for r in store.read("ev").collect()}
    assert got == {"0": None, "1": None, "2": "x", "3": "x"}


def test_user_session_settings_survive_and_timestamps_are_set_per_write(spark, store, tmp_path):
    """The store never leaves its settings on the session: a user's own values (or their
    absence) are what they were, while the store's files still get Delta's INT64 timestamps."""
    import pyarrow.parquet as pq

    from dollyflow.engine.delta import MERGE_METADATA_CONF, TIMESTAMP_OPTION, session_conf

    key = TIMESTAMP_OPTION[0]
    spark.conf.set(key, "INT96")
    spark.conf.set(MERGE_METADATA_CONF, "the user's own")
    try:
        store.write(rows(spark, 0, 4), "ts", job="a", run_id="r")
        store.merge(rows(spark, 2, 6), "ts", keys=["k"], job="b", run_id="r")
        assert spark.conf.get(key) == "INT96" and spark.conf.get(MERGE_METADATA_CONF) == "the user's own"
        files = list(Path(store.location("ts")).rglob("*.parquet"))
        assert files
        if store.backend == "offline":   # delta-rs commits need Delta's INT64 timestamps; Delta Spark reads either
            assert all(pq.ParquetFile(f).schema.column(4).physical_type == "INT64" for f in files)
        rows(spark, 0, 1).coalesce(1).write.parquet(str(tmp_path / "user"))   # the user's own write: their setting
        (mine,) = Path(tmp_path / "user").glob("*.parquet")
        assert pq.ParquetFile(mine).schema.column(4).physical_type == "INT96"
        with session_conf(spark, {MERGE_METADATA_CONF: "ours", "spark.dollyflow.unset.before": "x"}):
            assert spark.conf.get(MERGE_METADATA_CONF) == "ours"
        assert spark.conf.get(MERGE_METADATA_CONF) == "the user's own"
        assert spark.conf.get("spark.dollyflow.unset.before", None) is None   # unset again, not ""
    finally:
        spark.conf.unset(key)
        spark.conf.unset(MERGE_METADATA_CONF)


def test_backend_choice_says_why_and_native_fails_without_delta(spark, tmp_config, monkeypatch, backend):
    from dollyflow.engine.delta import backend

    auto = DeltaStore(spark, tmp_config("t").tables)
    if auto.native:   # the session with Delta's jars: auto picks native and says why
        assert "tables.backend=auto: Delta Lake's JVM classes (io.delta.tables.DeltaTable) are on the driver's " \
               "classpath" == auto.backend_reason
        return
    assert auto.backend == "offline" and "not on the driver's classpath (spark.delta_packages=off)" in auto.backend_reason
    assert "tables.backend=offline" == DeltaStore(spark, tmp_config("t", "tables.backend=offline").tables).backend_reason
    with pytest.raises(RuntimeError, match=r"tables.backend=native, but Delta Lake's JVM classes .* not on the "
                                           r"driver's classpath.*--packages io.delta"):
        DeltaStore(spark, tmp_config("t", "tables.backend=native").tables)
    # the check itself failing (Spark Connect, a broken gateway): local -> offline with the reason,
    # a cluster -> refuse to guess
    monkeypatch.setattr(backend, "detect_delta", lambda s: (None, "the check failed (boom)"))
    s = DeltaStore(spark, tmp_config("t").tables)
    assert s.backend == "offline" and "the check failed (boom)" in s.backend_reason
    monkeypatch.setattr(backend, "master_of", lambda s: "yarn")
    with pytest.raises(RuntimeError, match="cannot tell whether this session has Delta Lake"):
        DeltaStore(spark, tmp_config("t").tables)


def test_run_table_rows_are_redacted(spark, store):
    """Issue 18: the *_runs tables record inputs, shard and model paths; a URI's credentials
    never land there."""
    secret = "s3a://AKIAX:TOPSECRET@bucket/raw/data.jsonl?endpoint_override=h:9&sig=TOPSECRET"
    store.append_rows([("r1", [secret], {"where": secret}, '{"input": "' + secret + '"}')],
                      "run_id string, inputs array<string>, m map<string,string>, settings string", "runs_x")
    (row,) = store.read("runs_x").collect()
    text = str(row.asDict())
    assert "TOPSECRET" not in text and "AKIAX" not in text
    assert row["inputs"] == ["s3a://***@bucket/raw/data.jsonl?endpoint_override=h:9&sig=***"]


def test_staged_rows_are_counted_before_and_invisible_until_committed(spark, store):
    """stage() writes the files of a write and counts their rows without committing: the table
    stays at its version (and content) until commit_parts, and discard_parts leaves nothing."""
    store.write(rows(spark, 0, 4), "s", job="seed", run_id="r0")
    sink, parts = store.stage(rows(spark, 10, 17), "s")
    assert sum(r for _, _, r in parts) == 7 and store.version("s") == 0 and store.count("s") == 4
    assert keyed(store.read("s")) == keyed(rows(spark, 0, 4))
    c = store.commit_parts(sink, parts, "s", mode="overwrite", job="dedupe", run_id="r1")
    assert (c.version, c.rows) == (1, 7) and keyed(store.read("s")) == keyed(rows(spark, 10, 17))
    assert store.history("s", 1)[0]["run_id"] == "r1"
    assert [r["ts"] for r in store.read("s").limit(1).collect()][0].year == 2024
    sink2, parts2 = store.stage(rows(spark, 0, 3), "s")
    store.discard_parts(sink2)
    assert store.version("s") == 1 and not Path(sink2.directory).exists()
    assert keyed(store.read("s")) == keyed(rows(spark, 10, 17))


def test_merge_updates_only_matched_rows_meeting_update_when(spark, store):
    """A retry merge must not replace a stored good row by an incoming error row (a concurrent
    run whose rows errored), but must replace a stored error row by an incoming good one."""
    ddl = "k string, model_sha string, response string, finish_reason string"
    store.write(spark.createDataFrame([("good", "m1", "stored answer", "stop"),
                                       ("bad", "m1", None, "error")], ddl), "retry", job="seed", run_id="r0")
    incoming = spark.createDataFrame([("good", "m1", None, "error"), ("bad", "m1", "new answer", "stop"),
                                      ("new", "m1", "fresh", "length")], ddl)
    c = store.merge(incoming, "retry", keys=["k", "model_sha"], job="infer", run_id="r1",
                    update_when="t.finish_reason = 'error'")
    got = {r["k"]: (r["response"], r["finish_reason"]) for r in store.read("retry").collect()}
    assert got == {"good": ("stored answer", "stop"), "bad": ("new answer", "stop"), "new": ("fresh", "length")}
    assert (c.inserted, c.updated) == (1, 1)
    with pytest.raises(ValueError, match="update=False"):
        store.merge(incoming, "retry", keys=["k"], update=False, update_when="t.finish_reason = 'error'")


def test_replace_where_replaces_only_the_matching_rows_in_one_commit(spark, store):
    ddl = "k string, model_sha string, params_sha string, v long"
    first = [("a", "m1", "p1", 1), ("b", "m1", "p1", 2), ("a", "m2", "p1", 3), ("a", "m1", "p2", 4)]
    store.write(spark.createDataFrame(first, ddl), "rw", job="seed", run_id="r0")
    new = spark.createDataFrame([("c", "m1", "p1", 10)], ddl).selectExpr("*", "'x' AS extra")
    c = store.replace_where(new, "rw", {"model_sha": "m1", "params_sha": "p1"}, job="infer", run_id="r1")
    assert c.version == 1 == store.version("rw") and c.rows == 1
    got = sorted((r["k"], r["model_sha"], r["params_sha"], r["v"], r["extra"]) for r in store.read("rw").collect())
    assert got == [("a", "m1", "p2", 4, None), ("a", "m2", "p1", 3, None), ("c", "m1", "p1", 10, "x")]
    assert {h["version"]: h["run_id"] for h in store.history("rw")}[1] == "r1"
    assert store.read("rw", version=0).count() == 4           # the replaced rows are still in time travel
    # a missing table is created; a value that is not a plain token and an empty match are refused
    assert store.replace_where(new, "rw_new", {"model_sha": "m1"}) == 0 and store.read("rw_new").count() == 1
    with pytest.raises(ValueError, match="plain token"):
        store.replace_where(new, "rw", {"model_sha": "m1' OR '1'='1"})
    with pytest.raises(ValueError, match="at least one"):
        store.replace_where(new, "rw", {})


def test_the_store_delegates_to_one_of_two_backends_with_one_interface(spark, tmp_config):
    from dollyflow.engine.delta import DeltaBackend, NativeBackend, OfflineBackend

    for cls in (NativeBackend, OfflineBackend):
        assert issubclass(cls, DeltaBackend) and not cls.__abstractmethods__
    store = DeltaStore(spark, tmp_config("t", "tables.backend=offline").tables)
    assert isinstance(store._backend, OfflineBackend)
    assert (store.backend, store.native) == ("offline", False)


# -- one backend writes, the other reads ----------------------------------------------------------


@pytest.fixture
def pair(spark, tmp_config, backend):
    """(native store, offline store) on the session with Delta's jars, over one warehouse (the tests
    using it run on the native session only: :data:`NATIVE_ONLY`)."""
    assert backend == "native", "cross-backend tests need the session with Delta's jars"
    return (DeltaStore(spark, tmp_config("test", "tables.backend=native").tables),
            DeltaStore(spark, tmp_config("test", "tables.backend=offline").tables))


NATIVE_ONLY = pytest.mark.parametrize("backend", ["native"], indirect=True)


def everything(df):
    cols = sorted(df.columns)
    return sorted(df.dtypes), sorted(tuple(str(r[c]) for c in cols) for r in df.select(*cols).collect())


def same_on_both(pair, name, expected_rows):
    nat, off = pair
    assert everything(nat.read(name)) == everything(off.read(name))
    assert nat.count(name) == off.count(name) == expected_rows == off.read(name).count()


@NATIVE_ONLY
def test_native_delete_update_merge_with_deletion_vectors_read_offline(spark, pair):
    import deltalake

    nat, off = pair
    nat.write(rows(spark, 0, 30), "dv", job="seed", run_id="r0")
    path = nat.location("dv")
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    spark.sql(f"DELETE FROM delta.`{path}` WHERE v % 3 = 0")
    spark.sql(f"UPDATE delta.`{path}` SET tag = 'u' WHERE v = 1")
    nat.merge(rows(spark, 28, 33, tag="m"), "dv", keys=["k"], job="m", run_id="r1")
    dt = deltalake.DeltaTable(path)
    assert "deletionVectors" in (dt.protocol().reader_features or [])
    files_rows = sum(pa.table(dt.get_add_actions(flatten=True)).column("num_records").to_pylist())
    assert files_rows > 23          # the files still hold deleted rows: a file listing would bring them back
    same_on_both(pair, "dv", 23)    # 30 - 10 deleted + 3 new keys (30..32)
    got = {r["k"]: r["tag"] for r in off.read("dv").collect()}
    assert got["1"] == "u" and "3" not in got and got["29"] == "m" and got["32"] == "m"
    assert off.count("dv", 0) == 30 and off.read("dv", version=0).count() == 30
    # the `delta` data source registered on sessions without Delta's jars reads it the same way
    from dollyflow.engine.delta.offline_source import DeltaRsDataSource
    source = DeltaRsDataSource({"path": path})
    reader = source.reader(source.schema())
    keys = [r["k"] for part in reader.partitions() for batch in reader.read(part) for r in batch.to_pylist()]
    assert sorted(keys) == sorted(got)


@NATIVE_ONLY
def test_native_column_mapping_and_partitions_read_offline(spark, pair):
    nat, off = pair
    nat.write(rows(spark, 0, 4), "cm", job="seed", run_id="r0")
    path = nat.location("cm")
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.columnMapping.mode' = 'name', "
              "'delta.minReaderVersion' = '2', 'delta.minWriterVersion' = '5')")
    spark.sql(f"ALTER TABLE delta.`{path}` RENAME COLUMN tag TO label")
    nat.write(rows(spark, 4, 6).withColumnRenamed("tag", "label"), "cm", job="more", run_id="r1")
    same_on_both(pair, "cm", 6)
    assert "label" in off.read("cm").columns
    with pytest.raises(ValueError, match="column mapping"):
        off.write(rows(spark, 9, 10).withColumnRenamed("tag", "label"), "cm")
    # a partitioned table: the partition values live in the log, not in the files
    p = nat.location("parts")
    rows(spark, 0, 9).selectExpr("*", "cast(v % 3 as string) as part").write.format("delta") \
        .partitionBy("part").save(p)
    same_on_both(pair, "parts", 9)
    assert sorted({r["part"] for r in off.read("parts").collect()}) == ["0", "1", "2"]


@NATIVE_ONLY
def test_offline_writes_and_merges_read_natively(spark, pair):
    nat, off = pair
    off.write(rows(spark, 0, 10), "ow", job="seed", run_id="r0")
    off.merge(rows(spark, 5, 15, tag="b"), "ow", keys=["k"], job="m", run_id="r1")
    same_on_both(pair, "ow", 15)
    assert [h["run_id"] for h in nat.history("ow")] == ["r1", "r0"] == [h["run_id"] for h in off.history("ow")]
    nat.merge(rows(spark, 14, 16, tag="c"), "ow", keys=["k"], job="n", run_id="r2")
    same_on_both(pair, "ow", 16)
