"""The pipeline on an object store: the warehouse (native Delta tables through Spark's s3a://),
the shards (pyarrow, from Spark's Python workers too) and the trained model (staged, uploaded
with its manifest last, then fetched by infer) all on ``s3a://`` of a real S3-compatible server
process (s3proxy, tests/conftest.py ``s3_server``), every client with the credentials and
endpoint of the one ``storage:`` config section. Its rerun is a no-op."""
from __future__ import annotations

import json
import uuid

import pytest

from dollyflow.cli import main
from dollyflow.summaries import ALL_TABLES

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def fresh_jvm(monkeypatch):
    """No session running (the pipeline starts its own JVM, with hadoop-aws and Delta, and its
    workers inherit the storage settings); ``$DOLLYFLOW_S3`` unset before and after; the JVM this
    test started is stopped at the end."""
    from pyspark.sql import SparkSession

    from dollyflow.core import object_store, storage
    from dollyflow.engine.session import stop_local_session

    def stop():
        active = SparkSession.getActiveSession()
        if active is not None:
            stop_local_session(active)

    stop()
    monkeypatch.delenv(object_store.ENV, raising=False)
    storage._s3.cache_clear()
    yield
    stop()


def test_pipeline_with_warehouse_shards_and_model_on_s3a(fresh_jvm, s3_server, s3_storage, tmp_path, capsys,
                                                         sample_path, tokenizer_path):
    from pyspark.sql import SparkSession

    from dollyflow.config import TablesConfig
    from dollyflow.core import storage
    from dollyflow.core.training.remote import UPLOAD_MANIFEST
    from dollyflow.engine.delta import DeltaStore

    wh = f"s3a://{s3_server.bucket}/pipeline-{uuid.uuid4().hex[:8]}"
    args = ["pipeline", "--preset", "tiny", "--json", f"tables.warehouse={wh}", f"ingest.input={sample_path}",
            f"model.tokenizer={tokenizer_path}", "tokenize.test_size=0.1", "tables.backend=native",
            "spark.delta_packages=auto", *s3_storage]
    assert main(args) == 0
    out = capsys.readouterr()
    first = json.loads(out.out)
    assert first["status"] == "succeeded", out.err[-3000:]
    assert {"ingest", "dedupe", "tokenize", "train", "infer"} <= set(first["jobs"])
    assert {j["status"] for j in first["jobs"].values()} == {"changed"}, first["jobs"].keys()
    for name, job in first["jobs"].items():
        if "backend" in job["summary"]:
            assert job["summary"]["backend"] == "native", (name, job["summary"].get("backend_reason"))

    # the tables: native Delta logs on the server, read back through s3a
    spark = SparkSession.getActiveSession()
    assert "hadoop-aws" in spark.sparkContext.getConf().get("spark.jars.packages", "")
    store = DeltaStore(spark, TablesConfig(warehouse=wh))
    assert store.native
    for name in ALL_TABLES:
        assert store.version(name) is not None, name
        assert storage.exists(f"{wh}/dollyflow/{name}/_delta_log/00000000000000000000.json"), name
    # the shards: tokenize's versioned directory and pointer under the warehouse
    shard_dir = first["jobs"]["tokenize"]["summary"]["shard_dir"]
    assert shard_dir.startswith(f"{wh}/shards/"), shard_dir
    assert storage.exists(storage.join(shard_dir, "manifest.json"))
    # the model: trained in staging, uploaded, its manifest last, every listed file there
    train = first["jobs"]["train"]["summary"]
    model = train["output_dir"]
    assert model.startswith(f"{wh}/models/") and train["uploaded_files"] > 3, train
    manifest = json.loads(storage.read_bytes(storage.join(model, UPLOAD_MANIFEST)))
    assert manifest["fingerprint"] == train["fingerprint"]
    assert {"config.json", "model.safetensors", "dollyflow_model.json"} <= set(manifest["files"])
    for rel, size in manifest["files"].items():
        fs, p = storage.filesystem(storage.join(model, rel))
        assert fs.get_file_info(p).size == size, rel
    # predictions: infer fetched that model from the URI and answered every test record
    test_ids = {r["record_id"] for r in store.read("tokenized").where("split = 'test'").select("record_id").collect()}
    pred = first["jobs"]["infer"]["summary"]
    assert pred["model"] == model and pred["generated"] == len(test_ids) > 0
    assert {r["record_id"] for r in store.read("predictions").select("record_id").collect()} == test_ids
    # no secret in what was printed or written to the bucket (keys live in environment variables)
    assert s3_server.secret_key not in out.out + out.err
    fs, root = storage.filesystem(wh)
    import pyarrow.fs as pafs
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File and info.path.endswith((".json", ".jsonl", ".html", ".md", ".yaml")):
            with fs.open_input_stream(info.path) as f:
                assert s3_server.secret_key.encode() not in f.read(), info.path

    # the rerun: nothing to do, the model on the URI is recognised without training
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    status = {n: j["status"] for n, j in second["jobs"].items()}
    assert status["ingest"] == status["dedupe"] == status["infer"] == "unchanged", status
    assert second["jobs"]["train"]["summary"]["skipped"] is True
    assert second["jobs"]["train"]["summary"]["output_dir"] == model
