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
    storage.remove_dir(str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    storage.remove_dir(str(tmp_path / "x"))   # missing is fine
