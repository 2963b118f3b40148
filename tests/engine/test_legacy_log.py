"""Tables an earlier dollyflow's offline backend wrote, with the job name as a top-level ``job`` in each
commit's commitInfo (Delta Spark cannot parse those logs): found cheaply, kept on delta-rs by
``tables.backend=auto`` with the reason, refused by ``native`` before Spark reads them, and
rewritten in place by ``dollyflow tables upgrade-log``.

The legacy tables are written exactly as the old offline backend committed: delta-rs with
``custom_metadata`` {job, run_id, write_id, userMetadata} at the top level of commitInfo."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from dollyflow.cli import main
from dollyflow.engine.delta import BackendError, DeltaStore
from dollyflow.engine.delta.backend import check_legacy_logs
from dollyflow.engine.delta.commit import commit_options, user_metadata
from dollyflow.engine.delta.legacy_log import (BACKUP_PREFIX, UpgradeRefused, is_legacy_info, legacy_commit,
                                               legacy_tables, upgrade_log)
from dollyflow.engine.delta.offline_commits import commit_properties

deltalake = pytest.importorskip("deltalake")


def old_write(path, start: int, end: int, job: str, run_id: str, meta: str | None = "default") -> None:
    """One append committed as dollyflow's offline backend did before the fix: job, run_id, write_id
    (and the same as userMetadata JSON) as top-level custom metadata of the commit."""
    from deltalake import CommitProperties, write_deltalake
    write_id = uuid.uuid4().hex
    custom = {"job": job, "run_id": run_id, "write_id": write_id}
    if meta == "default":
        custom["userMetadata"] = user_metadata(job, run_id, write_id)
    elif meta is not None:
        custom["userMetadata"] = meta
    data = pa.table({"k": [str(i) for i in range(start, end)], "v": list(range(start, end))})
    write_deltalake(str(path), data, mode="append", commit_properties=CommitProperties(custom_metadata=custom))


def new_write(path, start: int, end: int, job: str, run_id: str) -> None:
    """One append committed as the offline backend does now (job only inside userMetadata)."""
    from deltalake import write_deltalake
    data = pa.table({"k": [str(i) for i in range(start, end)], "v": list(range(start, end))})
    write_deltalake(str(path), data, mode="append",
                    commit_properties=commit_properties(commit_options(job, run_id, uuid.uuid4().hex)))


def commit_infos(path) -> dict[int, dict]:
    out = {}
    for f in sorted((Path(path) / "_delta_log").glob("*.json")):
        for line in f.read_text().splitlines():
            if line.startswith('{"commitInfo"'):
                out[int(f.stem)] = json.loads(line)["commitInfo"]
    return out


@pytest.fixture
def warehouse(tmp_path):
    """A warehouse as an earlier dollyflow left it: bronze (legacy from version 1 on), runs (legacy,
    one commit without userMetadata), clean (written by this version), and a folder that is no table."""
    schema = tmp_path / "warehouse" / "dollyflow"
    new_write(schema / "bronze", 0, 5, "setup", "r0")
    old_write(schema / "bronze", 5, 10, "ingest", "run-1")
    old_write(schema / "bronze", 10, 12, "dedupe", "run-2")
    old_write(schema / "runs", 0, 1, "ingest", "run-1", meta=None)
    new_write(schema / "clean", 0, 3, "ingest", "run-3")
    (schema / "_staging").mkdir()
    return tmp_path / "warehouse"


# -- detection (no Spark) ---------------------------------------------------------------------------

def test_detection_finds_the_first_legacy_commit_and_caches_it(warehouse):
    schema = warehouse / "dollyflow"
    found = legacy_commit(str(schema / "bronze"))
    assert (found.version, found.job, found.name) == (1, "ingest", "bronze")
    assert found.file.endswith("_delta_log/00000000000000000001.json")
    assert legacy_commit(str(schema / "clean")) is None
    assert legacy_commit(str(schema / "missing")) is None
    assert [(c.name, c.version) for c in legacy_tables(str(schema))] == [("bronze", 1), ("runs", 0)]
    # cached per table: a later legacy commit of "clean" is seen only when asked to read again
    old_write(schema / "clean", 3, 4, "old", "r9")
    assert legacy_commit(str(schema / "clean")) is None
    assert legacy_commit(str(schema / "clean"), refresh=True).version == 1
    # Delta's own commitInfo job is a struct (Databricks job runs), or null: not legacy
    assert not is_legacy_info({"job": {"jobId": "1", "runId": "2"}}) and not is_legacy_info({"job": None})
    assert is_legacy_info({"job": "ingest"})


def test_unity_catalog_tables_are_not_checked(warehouse, tmp_config):
    tables = tmp_config("", f"tables.warehouse={warehouse}", "tables.catalog=main").tables
    assert check_legacy_logs(tables, True, "why") == (True, "why")
    path_based = tmp_config("", f"tables.warehouse={warehouse}").tables
    native, reason = check_legacy_logs(path_based, True, "tables.backend=auto: found")
    assert not native and "bronze (from version 1" in reason and "runs (from version 0" in reason
    assert "clean" not in reason and "dollyflow tables upgrade-log" in reason
    with pytest.raises(BackendError, match=r"tables.backend=native, but 2 table\(s\) .*bronze.*upgrade-log.*"
                                           r"fresh tables.warehouse.*tables.backend=offline"):
        check_legacy_logs(tmp_config("", f"tables.warehouse={warehouse}", "tables.backend=native").tables, True, "")


# -- the upgrade (no Spark) -------------------------------------------------------------------------

def test_upgrade_moves_job_into_user_metadata_and_keeps_everything_else(warehouse):
    table = warehouse / "dollyflow" / "bronze"
    log = table / "_delta_log"
    before_bytes = {f.name: f.read_bytes() for f in log.glob("*.json")}
    before_mtimes = {f.name: f.stat().st_mtime_ns for f in log.glob("*.json")}
    before_infos = commit_infos(table)
    before_history = deltalake.DeltaTable(str(table)).history()

    assert upgrade_log(str(table), dry_run=True).versions == [1, 2]
    assert {f.name: f.read_bytes() for f in log.glob("*.json")} == before_bytes
    assert not list(table.glob(BACKUP_PREFIX + "*"))

    done = upgrade_log(str(table))
    assert done.versions == [1, 2]
    backup = Path(done.backup)
    assert backup.parent == table and {f.name: f.read_bytes() for f in backup.glob("*.json")} == before_bytes
    assert {f.name: f.stat().st_mtime_ns for f in log.glob("*.json")} == before_mtimes   # Delta's timestamps
    after = commit_infos(table)
    assert after[0] == before_infos[0]                                    # untouched commit, byte for byte
    assert (log / "00000000000000000000.json").read_bytes() == before_bytes["00000000000000000000.json"]
    for v in (1, 2):
        assert "job" not in after[v]
        assert {k: x for k, x in after[v].items() if k != "job"} == {k: x for k, x in before_infos[v].items()
                                                                   if k != "job"}
        assert json.loads(after[v]["userMetadata"])["job"] == before_infos[v]["job"]
    # every non-commitInfo line is unchanged
    for name, data in before_bytes.items():
        old = [ln for ln in data.decode().splitlines() if not ln.startswith('{"commitInfo"')]
        assert [ln for ln in (log / name).read_text().splitlines() if not ln.startswith('{"commitInfo"')] == old
    assert legacy_commit(str(table)) is None
    assert len(deltalake.DeltaTable(str(table)).history()) == len(before_history)
    assert deltalake.DeltaTable(str(table)).to_pyarrow_table().num_rows == 12
    assert upgrade_log(str(table)).versions == []                          # nothing left: a no-op


def test_upgrade_builds_user_metadata_when_the_commit_had_none(warehouse):
    table = warehouse / "dollyflow" / "runs"
    run_id = commit_infos(table)[0]["run_id"]
    upgrade_log(str(table))
    meta = json.loads(commit_infos(table)[0]["userMetadata"])
    assert meta["job"] == "ingest" and meta["run_id"] == run_id == "run-1" and meta["write_id"]


def test_upgrade_refuses_what_it_cannot_move_and_changes_nothing(tmp_path):
    table = tmp_path / "t"
    old_write(table, 0, 2, "ingest", "r1")
    old_write(table, 2, 3, "ingest", "r2", meta="a note of the user's")   # not JSON: the job has nowhere to go
    before = {f.name: f.read_bytes() for f in (table / "_delta_log").glob("*.json")}
    with pytest.raises(UpgradeRefused, match=r"version 1's commitInfo has job='ingest' and a userMetadata that "
                                             r"is not a JSON object"):
        upgrade_log(str(table))
    assert {f.name: f.read_bytes() for f in (table / "_delta_log").glob("*.json")} == before
    assert not list(table.glob(BACKUP_PREFIX + "*"))
    with pytest.raises(UpgradeRefused, match="not a Delta table"):
        upgrade_log(str(tmp_path / "nothing"))


def test_cli_upgrades_every_legacy_table_of_the_warehouse(warehouse, capsys):
    schema = warehouse / "dollyflow"
    assert main(["tables", "upgrade-log", "--dry-run", f"tables.warehouse={warehouse}"]) == 0
    assert "bronze: would rewrite 2 commit(s) (versions 1, 2)" in capsys.readouterr().out
    assert legacy_commit(str(schema / "bronze"), refresh=True) is not None
    assert main(["tables", "upgrade-log", f"tables.warehouse={warehouse}"]) == 0
    out = capsys.readouterr().out
    assert "bronze: rewrote 2 commit(s)" in out and "runs: rewrote 1 commit(s)" in out and "clean" not in out
    assert legacy_tables(str(schema), refresh=True) == []
    assert main(["tables", "upgrade-log", f"tables.warehouse={warehouse}"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["tables", "upgrade-log", f"tables.warehouse={warehouse}", "tables.catalog=main"]) == 0
    assert "Unity Catalog" in capsys.readouterr().out
    assert main(["tables", "frobnicate"]) == 2


# -- the store on both kinds of session -------------------------------------------------------------

def history_of(store, name):
    return [(h["version"], h["job"], h["run_id"]) for h in sorted(store.history(name), key=lambda h: h["version"])]


LEGACY_HISTORY = [(0, "setup", "r0"), (1, "ingest", "run-1"), (2, "dedupe", "run-2")]


@pytest.mark.spark
def test_offline_reads_a_legacy_table_and_its_history(spark, warehouse, tmp_config):
    store = DeltaStore(spark, tmp_config("", f"tables.warehouse={warehouse}").tables)
    assert store.backend == "offline"
    assert store.count("bronze") == 12 and store.read("bronze").count() == 12
    assert history_of(store, "bronze") == LEGACY_HISTORY


@pytest.mark.spark
@pytest.mark.slow
def test_native_session_keeps_legacy_tables_on_delta_rs_until_upgraded(native_spark, warehouse, tmp_config):
    spark = native_spark
    auto = DeltaStore(spark, tmp_config("", f"tables.warehouse={warehouse}").tables)
    assert auto.backend == "offline"
    assert auto.backend_reason.startswith("tables.backend=auto: Delta Lake's JVM classes")
    assert "but 2 table(s) under" in auto.backend_reason and "bronze (from version 1" in auto.backend_reason
    assert "so delta-rs (offline backend)" in auto.backend_reason
    assert f"dollyflow tables upgrade-log tables.warehouse={warehouse}" in auto.backend_reason
    # with Delta's jars in the JVM, the offline backend still reads, writes and merges them
    assert auto.read("bronze").count() == 12 and auto.count("bronze") == 12
    assert history_of(auto, "bronze") == LEGACY_HISTORY
    auto.merge(spark.createDataFrame([("11", 11), ("12", 12)], "k string, v long"), "bronze", keys=["k"],
               job="dedupe", run_id="run-4", update=False)
    assert auto.count("bronze") == 13

    with pytest.raises(BackendError, match=r"tables.backend=native, but 2 table\(s\) .* bronze \(from version 1"):
        DeltaStore(spark, tmp_config("", f"tables.warehouse={warehouse}", "tables.backend=native").tables)

    assert main(["tables", "upgrade-log", f"tables.warehouse={warehouse}"]) == 0
    native = DeltaStore(spark, tmp_config("", f"tables.warehouse={warehouse}").tables)
    assert native.backend == "native" and "but" not in native.backend_reason
    assert native.count("bronze") == 13 and native.read("bronze").count() == 13
    assert history_of(native, "bronze") == LEGACY_HISTORY + [(3, "dedupe", "run-4")]
    assert spark.read.format("delta").load(str(warehouse / "dollyflow" / "runs")).count() == 1
    native.write(spark.createDataFrame([("20", 20)], "k string, v long"), "bronze", job="ingest", run_id="run-5")
    assert native.count("bronze") == 14 and os.path.isdir(warehouse / "dollyflow" / "bronze")
