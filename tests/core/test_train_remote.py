"""A train output directory on an object store (core/training/remote.py) against the s3proxy
server: staging names, the upload with its manifest last, replacement, verification, and what
a model reader (infer's listing) takes from an uploaded directory."""
from __future__ import annotations

import json

import pytest

from dollyflow.core import storage
from dollyflow.core.models.sources import listing
from dollyflow.core.training import remote


def _model(d, weights: bytes = b"w" * 10):
    (d / "checkpoints" / "step-1").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(weights)
    (d / "checkpoints" / "step-1" / "state.pt").write_bytes(b"s" * 5)
    return d


def test_staging_dir_is_local_per_uri_and_free_of_credentials(tmp_path):
    a = remote.staging_dir("s3a://KEY:SECRET@b/models/m1?endpoint_override=h:9", str(tmp_path))
    assert a.startswith(str(tmp_path)) and "SECRET" not in a and a.rsplit("/", 1)[-1].startswith("m1-")
    assert a != remote.staging_dir("s3a://b/models/m2", str(tmp_path))
    with pytest.raises(ValueError, match="train.staging_dir"):
        remote.staging_dir("s3a://b/m", "s3a://b/staging")


def test_publish_replace_and_check(tmp_path, s3_bucket):
    uri = s3_bucket("s3a", "remote-model/m")
    first = _model(tmp_path / "one")
    (first / "old-only.txt").write_text("x")
    assert remote.published(uri) is None
    m = remote.publish(str(first), uri, "fp1")
    assert m["fingerprint"] == "fp1" and m["files"]["model.safetensors"] == 10
    assert remote.check_published(uri, "fp1") == remote.published(uri)
    with pytest.raises(RuntimeError, match="another run"):
        remote.check_published(uri, "fp2")
    # a reader (infer) takes the model, not its checkpoints or the manifest
    _, _, files = listing(uri)
    assert [f[0] for f in files] == ["config.json", "model.safetensors", "old-only.txt"]

    second = _model(tmp_path / "two", weights=b"v" * 7)
    remote.publish(str(second), uri, "fp2")
    assert remote.published(uri)["fingerprint"] == "fp2"
    assert not storage.exists(storage.join(uri, "old-only.txt"))          # the replaced model's leftovers go
    assert storage.read_bytes(storage.join(uri, "model.safetensors")) == b"v" * 7
    assert not storage.exists(storage.join(uri, remote.UPLOAD_MANIFEST + ".replacing"))
    # a file lost after the upload is found by the check
    fs, p = storage.filesystem(storage.join(uri, "config.json"))
    fs.delete_file(p)
    with pytest.raises(RuntimeError, match="config.json"):
        remote.check_published(uri, "fp2")


def test_a_reader_refuses_a_model_being_replaced(tmp_path, s3_bucket):
    uri = s3_bucket("s3a", "remote-model/busy")
    remote.publish(str(_model(tmp_path / "m")), uri, "fp1")
    storage.write_bytes(storage.join(uri, remote.UPLOAD_MANIFEST + ".replacing"), b"{}")
    with pytest.raises(RuntimeError, match="being replaced"):
        listing(uri)


def test_stale_staging_of_another_fingerprint_is_cleared(tmp_path):
    from dollyflow.core.training import model_dir

    d = _model(tmp_path / "stage")
    (d / model_dir.PROVENANCE).write_text(json.dumps({"format": model_dir.FORMAT, "fingerprint": {"sha256": "old"}}))
    remote.prepare_staging("s3a://b/m", str(d), "old")
    assert d.exists()
    remote.prepare_staging("s3a://b/m", str(d), "new")
    assert not d.exists()
