"""The Delta module on this machine's backend (offline delta-rs here; native where Delta jars are)."""
import threading

import pytest

from dollyflow.config import ConfigError
from dollyflow.engine.delta import DeltaStore, resolve

pytestmark = pytest.mark.spark


@pytest.fixture
def store(spark, tmp_config):
    return DeltaStore(spark, tmp_config("test").tables)


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
