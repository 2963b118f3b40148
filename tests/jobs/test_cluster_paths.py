"""What works only because driver and executors share a disk is refused on a cluster master,
naming the key, unless the path lies on shared storage (a URI, a Databricks mount, or a mount
declared in ``tables.shared_mounts``); and the driver's check that the model directory a train run
reports is complete. No cluster needed: the checks take the master's URL (``spark://host:7077``).
The real cluster runs are in tests/cluster."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from dollyflow.config import ConfigError, load_config
from dollyflow.core.models.sources import ModelSource
from dollyflow.core.training.model_dir import PROVENANCE, ModelIncomplete, verify_complete
from dollyflow.core.training.prepare import output_dir_for

pytest.importorskip("pyspark")   # the jobs' modules import the engine

from dollyflow.engine.infer import InferSpec, needs_shipping, ship_model  # noqa: E402
from dollyflow.jobs.ingest import check_input_reachable  # noqa: E402
from dollyflow.jobs.train import check_rank_paths  # noqa: E402

MASTER = "spark://master.example:7077"


def cfg(job, tmp_path, *overrides, env=None):
    return load_config(job, [f"tables.warehouse={tmp_path / 'wh'}", *overrides], env=env)


def test_a_driver_local_ingest_input_is_refused_on_a_cluster_unless_its_mount_is_declared(tmp_path):
    data = tmp_path / "data" / "in.jsonl"
    c = cfg("ingest", tmp_path, f"ingest.input={data}")
    with pytest.raises(ValueError, match=r"ingest.input .*in.jsonl.* is a local path of the driver, but the Spark "
                                         r"master is 'spark://master.example:7077'.*tables.shared_mounts"):
        check_input_reachable(c, MASTER)
    check_input_reachable(c, "local[2]")                                    # one machine: fine
    check_input_reachable(cfg("ingest", tmp_path, f"ingest.input={data}", f"tables.shared_mounts=[{tmp_path}]"),
                          MASTER)                                           # declared shared mount
    check_input_reachable(cfg("ingest", tmp_path, f"ingest.input={tmp_path / 'data' / '*.jsonl'}",
                              f"tables.shared_mounts=[{tmp_path / 'data'}]"), MASTER)   # a glob under it
    check_input_reachable(cfg("ingest", tmp_path, "ingest.input=s3a://bucket/in/*.jsonl"), MASTER)
    with pytest.raises(ValueError, match="ingest.input"):                  # a sibling with the mount's prefix
        check_input_reachable(cfg("ingest", tmp_path, f"ingest.input={tmp_path}-other/in.jsonl",
                                  f"tables.shared_mounts=[{tmp_path}]"), MASTER)
    with pytest.raises(ValueError, match="ingest.input"):                  # file:// is this machine's disk
        check_input_reachable(cfg("ingest", tmp_path, f"ingest.input=file://{data}"), MASTER)


def test_shared_mounts_must_be_absolute_local_paths(tmp_path):
    for bad in ("relative/dir", "s3://bucket/x"):
        with pytest.raises(ConfigError, match="tables.shared_mounts"):
            cfg("ingest", tmp_path, f"tables.shared_mounts=[{bad}]")


def shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"records": 1}))
    return d


def test_train_outputs_ranks_on_other_hosts_cannot_see_are_refused(tmp_path):
    shards = shard_dir(tmp_path)
    ranks_out = ["train.local_mode=false", "train.processes=2", f"train.shard_dir={shards}"]
    c = cfg("train", tmp_path, *ranks_out, f"train.output_dir={tmp_path / 'model'}")
    with pytest.raises(ValueError, match=r"train.output_dir .*model' is a local path of the driver.*"
                                         r"tables.shared_mounts"):
        check_rank_paths(c, MASTER)
    check_rank_paths(c, "local[2]")
    # ranks on the driver (TorchDistributor's local mode) write the driver's own disk: fine
    check_rank_paths(cfg("train", tmp_path, f"train.shard_dir={shards}", f"train.output_dir={tmp_path / 'm'}"),
                     MASTER)
    # a shared output but a checkpoint directory on the driver's disk
    shared = tmp_path / "nfs"
    with pytest.raises(ValueError, match=r"train.checkpoint_dir '/tmp/ckpt' is a local path"):
        check_rank_paths(cfg("train", tmp_path, *ranks_out, f"train.output_dir={shared / 'model'}",
                             "train.checkpoint_dir=/tmp/ckpt", f"tables.shared_mounts=[{shared}]"), MASTER)
    check_rank_paths(cfg("train", tmp_path, *ranks_out, f"train.output_dir={shared / 'model'}",
                         f"tables.shared_mounts=[{shared}]"), MASTER)
    # Horovod on Spark runs its ranks on the executors too
    with pytest.raises(ValueError, match="train.output_dir"):
        check_rank_paths(cfg("train", tmp_path, "train.launcher=horovod", f"train.shard_dir={shards}",
                             f"train.output_dir={tmp_path / 'model'}"), MASTER)


def test_the_cluster_default_output_works_on_a_declared_shared_mount_and_names_the_setting_otherwise(tmp_path):
    shards = shard_dir(tmp_path)
    ranks_out = ["train.local_mode=false", "train.processes=2", f"train.shard_dir={shards}"]
    # --env cluster with the warehouse on a mount every node has, declared: the default output works
    c = load_config("train", [f"tables.warehouse={tmp_path / 'nfs' / 'wh'}", f"tables.shared_mounts=[{tmp_path}]",
                              *ranks_out], env="cluster")
    check_rank_paths(c, MASTER)
    assert output_dir_for(c).startswith(str(tmp_path / "nfs" / "wh" / "models") + "/")
    # undeclared: refused, naming the key and its default's origin
    c = load_config("train", [f"tables.warehouse={tmp_path / 'nfs' / 'wh'}", *ranks_out], env="cluster")
    with pytest.raises(ValueError, match=r"train.output_dir \(empty: its default under the files root, "
                                         r"tables.warehouse=.*tables.shared_mounts=\[<mount point>\]"):
        check_rank_paths(c, MASTER)
    # a URI warehouse: the default is a URI the ranks cannot write files to; the error says what to set
    c = load_config("train", ["tables.warehouse=s3a://bucket/wh", *ranks_out], env="cluster")
    with pytest.raises(ValueError, match=r"train.output_dir is empty and its default 's3a://bucket/wh/models/.*"
                                         r"set train.output_dir to a path every rank and the driver see.*"
                                         r"tables.shared_mounts"):
        check_rank_paths(c, MASTER)


def spec(kind: str, model_dir: str) -> InferSpec:
    return InferSpec(source=ModelSource(kind=kind, source=model_dir, pinned=model_dir, identity="x", key="k"),
                     model_dir=model_dir, cache_entry="", digest="0" * 64)


def test_which_models_are_shipped_to_the_executors(tmp_path):
    local = str(tmp_path / "model")
    assert not needs_shipping(spec("dir", local), "local[2]")
    assert needs_shipping(spec("dir", local), MASTER)                       # executors would not find it
    assert not needs_shipping(spec("dir", local), MASTER, [str(tmp_path)])   # on a declared shared mount
    assert not needs_shipping(spec("dir", "/Volumes/main/dollyflow/files/models/m"), MASTER)
    # downloaded by the driver with its credentials: the workers get the driver's copy
    for kind in ("hub", "mlflow", "uri"):
        assert needs_shipping(spec(kind, str(tmp_path / "cache" / "entry")), MASTER, [str(tmp_path)])
        assert not needs_shipping(spec(kind, str(tmp_path / "cache" / "entry")), "local[2]")
    # a session without a SparkContext (Spark Connect: unknown master, treated as remote) cannot
    # ship anything: the spec stays as it is and the workers read or fetch the source themselves
    remote = spec("hub", str(tmp_path / "cache" / "entry"))
    assert ship_model(object(), remote) is remote


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_path):
    pytest.importorskip("transformers")
    from dollyflow.core.models.build import tiny_gpt_neox
    from dollyflow.core.tokens import load_tokenizer
    from dollyflow.testing.fixtures import save_model_dir

    tok = load_tokenizer(str(tokenizer_path))
    out = tmp_path_factory.mktemp("verify") / "model"
    save_model_dir(tiny_gpt_neox(len(tok), hidden_size=32, layers=1), tok, out, {"steps": 0, "records": 0})
    return out


def test_verify_complete_names_what_is_missing(model_dir, tmp_path):
    def copy():
        d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(model_dir, d)
        return d

    assert verify_complete(str(model_dir))["files"]
    d = copy()
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelIncomplete, match=r"incomplete on the driver: model.safetensors \(listed in "
                                              r"dollyflow_model.json\) is missing.*safetensors weights"):
        verify_complete(str(d))
    d = copy()
    with open(d / "tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(ModelIncomplete, match=r"tokenizer.json has \d+ bytes, dollyflow_model.json recorded \d+"):
        verify_complete(str(d))
    d = copy()
    os.remove(d / PROVENANCE)        # the ranks wrote the model on another host: nothing here
    with pytest.raises(ModelIncomplete, match=r"holds no dollyflow_model.json on the driver.*tables.shared_mounts"):
        verify_complete(str(d))
    d = copy()
    (d / "config.json").unlink()
    prov = json.loads((d / PROVENANCE).read_text())
    prov["files"].pop("config.json")   # even when the manifest does not list it, loading needs it
    (d / PROVENANCE).write_text(json.dumps(prov))
    with pytest.raises(ModelIncomplete, match=r"config.json \(config.json\) is missing"):
        verify_complete(str(d))
