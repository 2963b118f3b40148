"""Path/URI helpers: joining, Spark-style schemes, reachability from executors, atomic writes."""
from __future__ import annotations

import pytest

from dollyflow.core import storage


def test_join_keeps_a_uri_query_at_the_end():
    base = "s3://b/shards?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(base, "v1-x", "manifest.json") == \
        "s3://b/shards/v1-x/manifest.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("/a/b/", "c") == "/a/b/c"


def test_spark_spellings_map_to_what_pyarrow_reads(monkeypatch):
    assert storage.native("s3a://bucket/key") == "s3://bucket/key"
    assert storage.native("s3n://bucket/key") == "s3://bucket/key"
    monkeypatch.setattr(storage, "DBFS_FUSE", "/nonexistent-dbfs-mount")
    with pytest.raises(ValueError, match="only on Databricks"):
        storage.native("dbfs:/tmp/x")


def test_dbfs_uri_goes_through_the_fuse_mount(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "DBFS_FUSE", str(tmp_path))
    storage.write_bytes("dbfs:/shards/a.bin", b"abc")
    assert (tmp_path / "shards" / "a.bin").read_bytes() == b"abc"
    assert storage.read_bytes("dbfs:/shards/a.bin") == b"abc"


@pytest.mark.parametrize("path, master, allow, ok", [
    ("/tmp/shards", "local[2]", False, True),            # one host: the driver's disk is everyone's
    ("/tmp/shards", "yarn", False, False),               # executors elsewhere: refused
    ("/tmp/shards", "spark://head:7077", True, True),    # the user says it is a shared mount
    ("/Volumes/main/dolly/files/shards", "spark://x:7077", False, True),
    ("/dbfs/tmp/shards", "yarn", False, True),
    ("s3a://bucket/shards", "yarn", False, True),
    ("file:///tmp/shards", "yarn", False, False),        # file:// is still one host's disk
    ("/tmp/shards", "", False, False),                   # unknown master (Spark Connect): remote
])
def test_local_paths_are_refused_when_executors_are_elsewhere(path, master, allow, ok):
    if ok:
        storage.check_reachable(path, master, allow)
    else:
        with pytest.raises(ValueError, match="executors on other hosts"):
            storage.check_reachable(path, master, allow)


def test_declared_shared_mounts_count_as_shared():
    mounts = ["/mnt/nfs"]
    storage.check_reachable("/mnt/nfs/wh/shards", "spark://head:7077", shared_mounts=mounts)
    storage.check_reachable("/mnt/nfs", "spark://head:7077", shared_mounts=mounts)
    with pytest.raises(ValueError, match=r"tokenize.output_dir '/mnt/nfs2/x' .*executors on other hosts.*"
                                         r"tables.shared_mounts=\[<mount point>\], or set tokenize.allow_local_output"):
        storage.check_reachable("/mnt/nfs2/x", "spark://head:7077", what="tokenize.output_dir", shared_mounts=mounts,
                                allow_key="tokenize.allow_local_output")
    assert storage.is_shared("/mnt/nfs/a/../b", mounts) and not storage.is_shared("/mnt/nfs/../x", mounts)


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "d" / "LATEST.json"
    storage.write_atomic(str(target), b"one")
    storage.write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["LATEST.json"]   # no temp files left


def test_list_and_remove(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "f.txt").write_text("1")
    assert storage.list_dir(str(tmp_path / "x")) == [("f.txt", False), ("y", True)]
    assert storage.list_dir(str(tmp_path / "missing")) == []
    storage.remove_dir(str(tmp_path / "x"), under=str(tmp_path))
    assert not (tmp_path / "x").exists()
    storage.remove_dir(str(tmp_path / "x"), under=str(tmp_path))   # missing is fine


# ---- issue 18: removals stay below their parent; atomic writes leave nothing half-written


@pytest.mark.parametrize("victim", ["..", "x/../..", ".", "x/.."])
def test_remove_dir_refuses_a_path_that_is_not_below_its_parent(tmp_path, victim):
    parent = tmp_path / "schema" / "_staging"
    (parent / "x").mkdir(parents=True)
    (tmp_path / "schema" / "bronze").mkdir()
    with pytest.raises(ValueError, match="does not lie below"):
        storage.remove_dir(f"{parent}/{victim}", under=str(parent))
    assert (tmp_path / "schema" / "bronze").is_dir() and (parent / "x").is_dir()


def test_remove_dir_refuses_a_symlink_that_leads_outside(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    parent = tmp_path / "root"
    parent.mkdir()
    (parent / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="does not lie below"):
        storage.remove_dir(str(parent / "link"), under=str(parent))
    assert (outside / "keep.txt").read_text() == "mine"


def test_check_within_for_uris():
    assert storage.check_within("s3://b/wh/dollyflow/t/w-1?region=x", "s3://b/wh/dollyflow/t")
    for bad in ("s3://b/wh/dollyflow/t/..", "s3://other/wh/dollyflow/t/w", "gs://b/wh/dollyflow/t/w",
                "s3://b/wh/dollyflow/t"):
        with pytest.raises(ValueError):
            storage.check_within(bad, "s3://b/wh/dollyflow/t")


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_write_atomic_renames_into_place_and_a_failure_leaves_the_old_content(tmp_path, monkeypatch, scheme):
    target = tmp_path / "root" / "LATEST.json"
    path = f"{scheme}{target}"
    storage.write_atomic(path, b"old")
    seen = []
    real = storage._rename

    def rename(fs, src, dst):
        seen.append((target.read_bytes(), src))     # the target still holds the old content
        real(fs, src, dst)

    monkeypatch.setattr(storage, "_rename", rename)
    storage.write_atomic(path, b"new")
    assert target.read_bytes() == b"new" and seen and seen[0][0] == b"old" and seen[0][1] != str(target)

    def broken(fs, src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(storage, "_rename", broken)
    with pytest.raises(OSError, match="disk went away"):
        storage.write_atomic(path, b"newer")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["LATEST.json"]   # no temp file left


def test_write_atomic_failing_before_the_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    storage.write_atomic(str(target), b"old")

    def no_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(storage.os, "fsync", no_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        storage.write_atomic(str(target), b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


# -- the storage: section against a real S3-compatible server (s3proxy) ------------------------

@pytest.fixture
def s3_settings(s3_storage, monkeypatch):
    """The storage: section pointed at the test server, active in this process for one test."""
    from dollyflow.config import load_config
    from dollyflow.core import object_store

    monkeypatch.delenv(object_store.ENV, raising=False)
    storage.__dict__["_s3"].cache_clear()
    cfg = load_config("", s3_storage)
    yield object_store.activate(cfg.storage)
    monkeypatch.delenv(object_store.ENV, raising=False)


def test_s3_paths_use_the_configured_endpoint_and_keys(s3_settings, s3_server):
    """Without credentials in the URI, s3:// and s3a:// reach the server through storage:."""
    base = f"s3a://{s3_server.bucket}/config-storage"
    storage.write_atomic(storage.join(base, "a", "x.txt"), b"one")
    assert storage.read_bytes(f"s3://{s3_server.bucket}/config-storage/a/x.txt") == b"one"
    assert storage.list_dir(base) == [("a", True)]
    storage.remove_dir(storage.join(base, "a"), under=base)
    assert not storage.exists(storage.join(base, "a", "x.txt"))


def test_delta_rs_uses_the_same_settings(s3_settings, s3_server):
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from dollyflow.core.object_store import storage_options

    path = f"s3a://{s3_server.bucket}/config-delta/t"
    write_deltalake(path, pa.table({"x": [1, 2]}), storage_options=storage_options(path))
    write_deltalake(path, pa.table({"x": [3]}), mode="append", storage_options=storage_options(path))
    dt = DeltaTable(path, storage_options=storage_options(path))
    assert dt.version() == 1 and sorted(dt.to_pyarrow_table()["x"].to_pylist()) == [1, 2, 3]
    assert storage.exists(f"{path}/_delta_log/00000000000000000001.json")    # pyarrow sees delta-rs' files


def test_a_missing_key_variable_is_named(monkeypatch):
    from dollyflow.config import load_config
    from dollyflow.core import object_store

    cfg = load_config("", ["storage.endpoint=http://127.0.0.1:1", "storage.access_key_env=NO_SUCH_KEY_VAR_X"])
    monkeypatch.delenv("NO_SUCH_KEY_VAR_X", raising=False)
    with pytest.raises(ValueError, match="storage.access_key_env: the environment variable NO_SUCH_KEY_VAR_X"):
        object_store.pyarrow_options(object_store.settings_of(cfg.storage))


def test_storage_endpoint_with_credentials_is_refused():
    from dollyflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="storage.endpoint"):
        load_config("", ["storage.endpoint=http://KEY:SECRET@host:9000"])
    with pytest.raises(ConfigError, match="storage.secret_key_env"):
        load_config("", ["storage.secret_key_env=not a name"])
