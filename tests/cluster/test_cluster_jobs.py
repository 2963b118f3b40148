"""The jobs through the real ``spark-submit --master spark://...`` on the standalone cluster of
``spark_cluster`` (a master and two one-core workers, each its own JVM), with native Delta
(``--packages`` + Delta's two confs): ingest, dedupe, tokenize, train with TorchDistributor on the
executors (``train.local_mode=false``, 2 ranks, CPU), infer with the UDF on the executors, and
``dolly_generate`` from ``spark.sql`` in a submitted script with the model shipped from the
driver. The whole test directory is one shared mount here, declared as such
(``tables.shared_mounts``), as an NFS mount would be on a real cluster. Each test is one step of
the chain and uses the previous one's outputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("deltalake")
pytest.importorskip("deepspeed")

from dollyflow.core.training.model_dir import read_provenance, verify_complete  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.cluster, pytest.mark.spark, pytest.mark.slow, pytest.mark.distributed]


def delta_rows(path: str) -> list[dict]:
    from deltalake import DeltaTable
    return DeltaTable(path).to_pyarrow_table().to_pylist()


def history(path: str) -> list[dict]:
    from deltalake import DeltaTable
    return DeltaTable(path).history()


@pytest.fixture(scope="module")
def chain(tmp_path_factory, sample_path, tokenizer_path):
    root = tmp_path_factory.mktemp("on-cluster")
    (root / "input").mkdir()
    shutil.copy(sample_path, root / "input" / "sample.jsonl")
    common = ["--env", "cluster", "--preset", "tiny", f"tables.warehouse={root / 'wh'}",
              f"tables.shared_mounts=[{root}]", f"model.tokenizer={tokenizer_path}"]
    return {"root": root, "common": common}


def job(submit, chain, name: str, *overrides: str) -> dict:
    summary, seconds = submit(REPO / "jobs" / f"{name}.py", *chain["common"], *overrides, cwd=chain["root"])
    chain[name] = summary
    print(f"{name} through spark-submit on the cluster: {seconds:.1f} s")
    return summary


def needs(chain, name):
    if name not in chain:
        pytest.skip(f"the {name} step did not run")
    return chain[name]


def test_ingest_on_the_cluster(submit, chain, spark_cluster, dolly_records):
    s = job(submit, chain, "ingest", f"ingest.input={chain['root'] / 'input' / 'sample.jsonl'}")
    assert s["backend"] == "native", s.get("backend_reason")
    assert s["lines_read"] == len(dolly_records) == s["rows_new"] + s["rows_existing"] + s["rows_quarantined"]
    bronze = delta_rows(s["bronze"])
    assert len(bronze) == s["rows_new"] > 0
    assert history(s["bronze"])[0]["operation"] in ("MERGE", "WRITE", "CREATE TABLE AS SELECT")
    # the application really ran on the cluster's two executors
    apps = spark_cluster.status()["completedapps"]
    assert apps and all(a.get("cores", 0) >= 1 for a in apps)


def test_dedupe_on_the_cluster(submit, chain):
    bronze = delta_rows(needs(chain, "ingest")["bronze"])
    s = job(submit, chain, "dedupe")
    silver = delta_rows(s["silver"])
    assert 0 < len(silver) <= len(bronze)
    assert len({r["record_id"] for r in silver}) == len(silver)


def test_tokenize_on_the_cluster(submit, chain):
    needs(chain, "dedupe")
    # silver straight (the filter job is tested on local Spark: tests/jobs/test_filter.py)
    s = job(submit, chain, "tokenize", "tokenize.max_length=512", "tokenize.test_size=8", "tokenize.num_shards=2",
            "tokenize.source_table=silver")
    assert Path(s["shard_dir"]).is_relative_to(chain["root"] / "wh" / "shards")
    manifest = json.loads((Path(s["shard_dir"]) / "manifest.json").read_text())
    assert manifest["records"] == s["records_tokenized"] == s["silver_rows"] - s["records_dropped"] > 0
    assert s["shards"]["train"] >= 1 and s["shards"]["test"] >= 1
    tokenized = delta_rows(s["tokenized"])       # the kept records, each with its split
    assert len(tokenized) == s["records_tokenized"] and {r["split"] for r in tokenized} == {"train", "test"}


def test_train_with_torch_distributor_on_the_executors(submit, chain):
    needs(chain, "tokenize")
    s = job(submit, chain, "train", "train.local_mode=false", "train.processes=2", "train.use_gpu=false",
            "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2", "train.mlflow=false")
    assert s["launcher"] == "torch_distributor" and s["processes"] == 2 and s["steps"] == 4 and not s["skipped"]
    out = Path(s["output_dir"])
    # the default output follows the files root on the declared shared mount
    assert out.parent == chain["root"] / "wh" / "models"
    prov = verify_complete(str(out))
    assert prov["processes"] == 2 and (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert read_provenance(str(out))["fingerprint"]["sha256"] == s["fingerprint"]
    assert list((out / "checkpoints").iterdir())
    assert delta_rows(s["train_runs"])[-1]["steps"] == 4


def _core_answers(model_dir: str, rows: list[dict], max_new_tokens: int):
    from dollyflow.core.generation.generator import Generator
    from dollyflow.core.generation.params import GenerationParams
    from dollyflow.core.models.loading import load_for_generation
    model, tok = load_for_generation(model_dir)
    return Generator(model, tok, GenerationParams(max_new_tokens=max_new_tokens)).generate(
        [r["instruction"] for r in rows], [r["context"] for r in rows])


def test_infer_with_the_udf_on_the_executors(submit, chain):
    model = needs(chain, "train")["output_dir"]
    s = job(submit, chain, "infer", f"infer.model={model}", "infer.limit=4", "infer.max_new_tokens=8",
            "infer.extra_columns=[instruction, context]", "run_id=cluster-infer")
    assert s["generated"] == 4 and s["rows_in"] == 4
    predictions = delta_rows(s["predictions"])
    assert len(predictions) == 4 and {p["run_id"] for p in predictions} == {"cluster-infer"}
    assert all(p["error"] is None for p in predictions)
    predictions.sort(key=lambda p: p["record_id"])
    for p, w in zip(predictions, _core_answers(model, predictions, 8)):
        assert (p["response"], p["finish_reason"], p["completion_tokens"]) == \
            (w.response, w.finish_reason, w.completion_tokens)


def test_dolly_generate_from_spark_sql_with_the_model_shipped(submit, chain):
    model = needs(chain, "train")["output_dir"]
    silver = needs(chain, "dedupe")["silver"]
    # a file:// URI: the driver downloads it into its own cache; the executors get that copy
    # shipped with the job (addArchive) instead of fetching the source again
    out, seconds = submit(HERE / "sql_generate.py", silver, *chain["common"][:2], *chain["common"][4:],
                          f"infer.model=file://{model}", "infer.max_new_tokens=8", cwd=chain["root"])
    print(f"dolly_generate from spark.sql through spark-submit on the cluster: {seconds:.1f} s")
    assert out["master"].startswith("spark://")
    assert out["shipped"].startswith("dollyflow-model-") and out["executors_see_shipped"] == [True] * 4
    rows = out["rows"]
    assert len(rows) == 3 and all(r["error"] is None for r in rows)
    for r, w in zip(rows, _core_answers(model, rows, 8)):
        assert (r["response"], r["finish_reason"], r["completion_tokens"]) == \
            (w.response, w.finish_reason, w.completion_tokens)
