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
