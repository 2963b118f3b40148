"""The dolly_generate UDF (SQL and DataFrame) and the infer job into the predictions table
(Spark, local[2], the tiny trained Dolly model of conftest ``dolly_model_dir``)."""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytest.importorskip("torch")

from dollyflow.core.generation.generator import Generator  # noqa: E402
from dollyflow.core.generation.params import FINISH_ERROR, FINISH_STOP, GenerationParams  # noqa: E402
from dollyflow.core.models.files import model_digest  # noqa: E402
from dollyflow.core.models.loading import load_for_generation  # noqa: E402
from dollyflow.core.records import record_id  # noqa: E402

pytestmark = pytest.mark.spark

SILVER_DDL = ("record_id string, instruction string, context string, response string, category string, "
              "source_file string, source_line long, ingested_at timestamp, run_id string")
MAX_NEW = 24


def silver_rows(records):
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [(record_id(r["instruction"], r["context"], r["response"], r["category"]), r["instruction"],
             r["context"], r["response"], r["category"], "sample", n, now, "test")
            for n, r in enumerate(records, 1)]


@pytest.fixture(scope="module")
def core_answers(dolly_model_dir, dolly_records):
    """The core's greedy answers, in this process, for the reference."""
    model, tok = load_for_generation(str(dolly_model_dir))
    g = Generator(model, tok, GenerationParams(max_new_tokens=MAX_NEW))
    recs = dolly_records[:40]
    out = g.generate([r["instruction"] for r in recs], [r["context"] for r in recs])
    return {r["instruction"]: o for r, o in zip(recs, out)}


@pytest.fixture(scope="module")
def udf_cfg(tmp_path_factory, dolly_model_dir):
    from dollyflow.config import load_config
    root = tmp_path_factory.mktemp("infer-udf")
    return load_config("infer", [f"tables.warehouse={root / 'warehouse'}", f"infer.model={dolly_model_dir}",
                                 f"infer.max_new_tokens={MAX_NEW}", "infer.window_rows=4", "infer.batch_tokens=2000"])


@pytest.fixture
def small_arrow_batches(spark):
    """Arrow batches of 3 rows, so that every task hands the UDF several batches."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(key)
    spark.conf.set(key, "3")
    yield
    spark.conf.set(key, previous)


def test_sql_and_dataframe_give_the_core_answers_and_load_once_per_worker(spark, udf_cfg, dolly_records,
                                                                          core_answers, small_arrow_batches):
    from pyspark.sql import functions as F

    from dollyflow.engine.infer import load_accumulator, register_udf, summarize_counts

    counts = load_accumulator(spark)
    udf = register_udf(spark, udf_cfg, counts=counts)
    recs = dolly_records[:40]
    df = spark.createDataFrame([(i, r["instruction"], r["context"]) for i, r in enumerate(recs)],
                               "id int, instruction string, context string").repartition(6)
    df.createOrReplaceTempView("prompts")
    sql = {r["id"]: r for r in spark.sql(
        "SELECT id, g.response, g.finish_reason, g.completion_tokens, g.error FROM "
        "(SELECT id, dolly_generate(instruction, context) AS g FROM prompts)").collect()}
    frame = {r["id"]: r for r in df.select("id", udf("instruction", "context").alias("g"))
             .select("id", "g.*").collect()}
    assert len(sql) == len(frame) == len(recs)
    for i, r in enumerate(recs):
        want = core_answers[r["instruction"]]
        assert sql[i]["response"] == frame[i]["response"] == want.response
        assert sql[i]["finish_reason"] == frame[i]["finish_reason"] == want.finish_reason
        assert sql[i]["completion_tokens"] == want.completion_tokens and sql[i]["error"] is None
    stats = summarize_counts(counts.value)
    # 2 queries x 6 tasks, Arrow batches of 3 rows, windows of 4 rows: more windows than tasks,
    # more tasks than workers, and every Python worker loaded the model once
    assert stats["tasks"] == 12 and stats["windows"] > stats["tasks"]
    assert 1 <= stats["workers"] <= 4 and stats["loads_per_worker"] == 1
    assert stats["loads"] == len({pid for (event, pid) in counts.value if event == "load"})
    assert stats["load_seconds"] > 0          # the loads were timed (imports, tokenizer, weights)
    # registering again (a new UDF object, new closure) reuses the workers' loaded model
    again = load_accumulator(spark)
    register_udf(spark, udf_cfg, counts=again)
    assert spark.sql("SELECT dolly_generate(instruction, context).response AS r FROM prompts").count() == len(recs)
    reused = summarize_counts(again.value)
    assert reused["loads"] == 0 and reused["load_seconds"] == 0


def test_one_argument_form_and_seeds_through_sql(spark, udf_cfg, dolly_records, core_answers):
    from dollyflow.engine.infer import register_udf

    register_udf(spark, udf_cfg, name="dolly_answer")
    no_context = [r for r in dolly_records[:40] if not r["context"]][:3]
    spark.createDataFrame([(r["instruction"],) for r in no_context], "instruction string") \
        .createOrReplaceTempView("questions")
    got = spark.sql("SELECT instruction, dolly_answer(instruction).response AS r FROM questions").collect()
    assert {g["instruction"]: g["r"] for g in got} == {r["instruction"]: core_answers[r["instruction"]].response
                                                      for r in no_context}
    literal = spark.sql("SELECT dolly_answer('Which is a species of fish? Tope or Rope') AS g").first()["g"]
    assert literal["finish_reason"] in ("stop", "length") and literal["error"] is None


def test_seeded_sampling_is_the_same_in_spark_and_in_the_core(spark, udf_cfg, dolly_model_dir, dolly_records):
    from dollyflow.config import load_config
    from dollyflow.engine.infer import register_udf

    cfg = load_config("infer", [f"tables.warehouse={udf_cfg.tables.warehouse}", f"infer.model={dolly_model_dir}",
                                "infer.max_new_tokens=8", "infer.do_sample=true", "infer.seed=3",
                                "infer.window_rows=5"])
    register_udf(spark, cfg, name="dolly_sample")
    recs = dolly_records[:12]
    spark.createDataFrame([(i, r["instruction"], r["context"], 1000 + i) for i, r in enumerate(recs)],
                          "id int, instruction string, context string, seed long").repartition(3) \
        .createOrReplaceTempView("to_sample")
    derived = {r["id"]: r["t"] for r in spark.sql(
        "SELECT id, dolly_sample(instruction, context).response AS t FROM to_sample").collect()}
    explicit = {r["id"]: r["t"] for r in spark.sql(
        "SELECT id, dolly_sample(instruction, context, seed).response AS t FROM to_sample").collect()}
    model, tok = load_for_generation(str(dolly_model_dir))
    g = Generator(model, tok, GenerationParams(max_new_tokens=8, do_sample=True, seed=3), max_batch_size=1)
    ins, ctx = [r["instruction"] for r in recs], [r["context"] for r in recs]
    assert [derived[i] for i in range(12)] == [o.response for o in g.generate(ins, ctx)]
    assert [explicit[i] for i in range(12)] == [o.response for o in g.generate(ins, ctx, [1000 + i for i in range(12)])]


def test_bad_rows_become_error_rows_and_the_rest_is_answered(spark, tmp_path, dolly_model_dir, dolly_records,
                                                           core_answers):
    """Null and blank instructions, a prompt that cannot fit, a context that must be trimmed, and
    a row whose forward pass fails (NaN weights for a token only it uses) -- in one task's batch."""
    import torch

    from dollyflow.config import load_config
    from dollyflow.engine.infer import register_udf
    from dollyflow.core.prompt import format_inference_prompt

    poisoned = tmp_path / "poisoned"
    shutil.copytree(dolly_model_dir, poisoned)
    model, tok = load_for_generation(str(poisoned))
    good = [r for r in dolly_records[:40] if len(r["context"]) < 400][:4]
    used = set()
    for r in good:
        used |= set(tok(format_inference_prompt(r["instruction"], r["context"]))["input_ids"])
    odd = "Describe a zebra"
    poison = next(i for i in tok(format_inference_prompt(odd, ""))["input_ids"] if i not in used)
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("nan")
    model.save_pretrained(str(poisoned))
    cfg = load_config("infer", [f"tables.warehouse={tmp_path / 'wh'}", f"infer.model={poisoned}",
                                f"infer.max_new_tokens={MAX_NEW}"])
    register_udf(spark, cfg, name="dolly_poisoned")
    long_context = " ".join(f"w{i}" for i in range(1200)) + " The end."
    rows = [(0, None, None), (1, "  ", "ctx"), (2, good[0]["instruction"], good[0]["context"]),
            (3, odd, ""), (4, good[1]["instruction"], good[1]["context"]), (5, "Summarise.", long_context),
            (6, " ".join(f"q{i}" for i in range(1200)), ""), (7, good[2]["instruction"], good[2]["context"]),
            (8, good[3]["instruction"], good[3]["context"])]
    spark.createDataFrame(rows, "id int, instruction string, context string").coalesce(1) \
        .createOrReplaceTempView("bad_rows")
    got = {r["id"]: r["g"] for r in spark.sql(
        "SELECT id, dolly_poisoned(instruction, context) AS g FROM bad_rows").collect()}
    errors = {i for i, g in got.items() if g["finish_reason"] == FINISH_ERROR}
    assert errors == {0, 1, 3, 6}
    assert "empty instruction" in got[0]["error"] and "empty instruction" in got[1]["error"]
    assert "non-finite" in got[3]["error"] and got[6]["error"].startswith("prompt too long")
    assert got[5]["error"] is None and got[5]["trimmed_context_tokens"] > 0
    for i, r in zip((2, 4, 7, 8), good):
        assert got[i]["response"] == core_answers[r["instruction"]].response and got[i]["error"] is None


# ---------------------------------------------------------------------------------------------
# the job


@pytest.fixture(scope="module")
def project(spark, tmp_path_factory, dolly_records, dolly_model_dir):
    """silver (40 sample records + 2 bad ones) and a tokenized table marking 10 of them test."""
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore

    root = tmp_path_factory.mktemp("infer-job")
    base = [f"tables.warehouse={root / 'warehouse'}", "spark.shuffle_partitions=4", f"infer.model={dolly_model_dir}",
            f"infer.max_new_tokens={MAX_NEW}", "infer.window_rows=8"]
    cfg = load_config("infer", base)
    store = DeltaStore(spark, cfg.tables)
    rows = silver_rows(dolly_records[:40])
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows += [("bad-null", None, "", "x", "open_qa", "sample", 0, now, "test"),
             ("bad-blank", "   ", "", "x", "open_qa", "sample", 0, now, "test")]
    store.write(spark.createDataFrame(rows, SILVER_DDL), cfg.tables.silver, mode="overwrite")
    test_ids = [r[0] for r in rows[:10]] + ["bad-null", "bad-blank"]
    split = [(r[0], "test" if r[0] in test_ids else "train") for r in rows]
    store.write(spark.createDataFrame(split, "record_id string, split string"), cfg.tables.tokenized,
                mode="overwrite")
    return {"base": base, "store": store, "rows": rows, "test_ids": test_ids, "root": root}


def run_job(spark, project, *overrides):
    from dollyflow.config import load_config
    from dollyflow.jobs import infer
    return infer.run(load_config("infer", [*project["base"], *overrides]), spark)


def test_job_scores_the_test_split_into_predictions_and_appends_idempotently(spark, project, dolly_model_dir,
                                                                             core_answers, capfd):
    store = project["store"]
    first = run_job(spark, project, "infer.extra_columns=[category]")
    assert first["rows_in"] == 12 and first["generated"] == 12 and first["already_predicted"] == 0
    # which kind of source was used, in the summary and on stderr
    assert first["model_source"] == {"kind": "dir", "source": str(dolly_model_dir), "resolved": str(dolly_model_dir),
                                     "identity": str(dolly_model_dir)}
    err = capfd.readouterr().err
    assert f"dollyflow infer: model source dir: {dolly_model_dir}" in err
    # the fixture model has no training provenance: the current tokenized table, with a warning
    assert first["input"]["tokenized_from"] == "current (no model provenance)"
    assert len(first["warnings"]) == 1 and "no training provenance" in first["warnings"][0]
    assert "warning: the model has no training provenance" in err
    assert first["finish_reasons"].get("error") == 2
    # the workers of the earlier tests already hold this model: it is not loaded again
    assert first["workers"]["tasks"] >= 1 and first["workers"]["loads_per_worker"] <= 1
    table = store.read("predictions").collect()
    assert sorted(r["record_id"] for r in table) == sorted(project["test_ids"])
    by_id = {r["record_id"]: r for r in table}
    sha = model_digest(str(dolly_model_dir))
    params = GenerationParams(max_new_tokens=MAX_NEW)
    for rid, r in by_id.items():
        assert r["model_sha"] == sha and r["model"] == str(dolly_model_dir)
        assert json.loads(r["params"]) == params.to_dict() and r["params_sha"] == params.digest()
        assert r["run_id"] == first["run_id"] and r["created_at"] is not None
        assert json.loads(r["model_info"])["kind"] == "fixture"
    silver = {r[0]: r for r in project["rows"]}
    for rid in project["test_ids"][:10]:
        want = core_answers[silver[rid][1]]
        assert by_id[rid]["response"] == want.response and by_id[rid]["finish_reason"] == want.finish_reason
        assert by_id[rid]["category"] == silver[rid][4]
    assert by_id["bad-null"]["finish_reason"] == FINISH_ERROR and by_id["bad-null"]["response"] is None
    v1 = first["predictions_version"]

    # the same model and parameters again: nothing generated, nothing added (the error rows are
    # retried and updated in place)
    second = run_job(spark, project, "infer.extra_columns=[category]")
    assert second["already_predicted"] == 10 and second["generated"] == 2
    assert store.read("predictions").count() == 12
    third = run_job(spark, project, "infer.extra_columns=[category]", "infer.retry_errors=false")
    assert third["generated"] == 0 and third["predictions_version"] == second["predictions_version"] > v1

    # other parameters are other predictions: appended beside the first ones
    fourth = run_job(spark, project, "infer.extra_columns=[category]", "infer.max_new_tokens=4",
                     "infer.split=all", "infer.limit=5")
    assert fourth["generated"] == 5 and fourth["finish_reasons"].get("stop", 0) + \
        fourth["finish_reasons"].get("length", 0) + fourth["finish_reasons"].get("error", 0) == 5
    assert store.read("predictions").count() == 17


def test_job_query_input_overwrite_and_key_checks(spark, project):
    """Overwrite replaces the rows of this model_sha + params_sha only, in one commit; with no
    input rows it removes nothing."""
    from pyspark.sql import functions as F

    store = project["store"]
    before = store.read("predictions").collect()
    mine = GenerationParams(max_new_tokens=MAX_NEW).digest()
    others = sorted((r["record_id"], r["params_sha"], r["response"], r["run_id"]) for r in before
                    if r["params_sha"] != mine)
    assert len(others) == 5 and len(before) == 17       # the max_new_tokens=4 rows of the test above
    v0 = store.version("predictions")
    out = run_job(spark, project, "infer.mode=overwrite",
                  "infer.query=SELECT record_id, instruction, context FROM silver WHERE category = 'closed_qa'")
    closed = [r for r in project["rows"] if r[4] == "closed_qa"]
    assert out["generated"] == len(closed) > 0 and out["input"]["views"] == ["silver", "tokenized"]
    assert out["replaced_rows"] == 12 and out["predictions_version"] == v0 + 1 == store.version("predictions")
    after = store.read("predictions").collect()
    assert sorted(r["record_id"] for r in after if r["params_sha"] == mine) == sorted(r[0] for r in closed)
    assert sorted((r["record_id"], r["params_sha"], r["response"], r["run_id"]) for r in after
                  if r["params_sha"] != mine) == others        # other parameters' predictions kept as they were
    # an overwrite with no input rows removes nothing and says so
    empty = run_job(spark, project, "infer.mode=overwrite",
                    "infer.query=SELECT record_id, instruction, context FROM silver WHERE category = 'no such'")
    assert empty["rows_in"] == 0 and empty["generated"] == 0 and "unchanged" in empty["written"]
    assert store.version("predictions") == v0 + 1 and store.read("predictions").count() == len(after)
    assert store.read("predictions").where(F.col("params_sha") == mine).count() == len(closed)
    with pytest.raises(ValueError, match=r"key column\(s\) \['doc_id'\]"):
        run_job(spark, project, "infer.key_columns=[doc_id]")
    with pytest.raises(ValueError, match="infer.model is empty"):
        run_job(spark, project, "infer.model=")


@pytest.mark.parametrize("statement", [
    "DROP TABLE tokenized",
    "/* looks harmless */ -- so does this\n  DELETE FROM silver",
    "SELECT record_id, instruction, context FROM silver; DROP TABLE tokenized",
    "WITH x AS (SELECT * FROM silver) INSERT INTO tokenized SELECT record_id, 'test' FROM x",
    "SET spark.sql.shuffle.partitions=1",
])
def test_job_query_must_be_a_query(spark, project, statement):
    """Anything but a query fails before it runs (it would run with the job's identity)."""
    from dollyflow.engine.query import NotAQuery

    store = project["store"]
    versions = {n: store.version(n) for n in ("silver", "tokenized", "predictions")}
    shuffle = spark.conf.get("spark.sql.shuffle.partitions")
    with pytest.raises(NotAQuery, match="infer.query must be a single query .* so nothing was run"):
        run_job(spark, project, f"infer.query={statement}")
    assert {n: store.version(n) for n in versions} == versions
    assert spark.conf.get("spark.sql.shuffle.partitions") == shuffle


def _weights_last_byte(model_dir, byte: bytes) -> None:
    w = model_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + byte)


def test_workers_check_the_full_digest_of_the_weights_they_load(spark, tmp_path, dolly_model_dir, udf_cfg):
    """The driver hashed the model; the weights the workers then find at that path have the same
    file names and sizes but other content (a stale copy, a rewrite): the UDF fails, naming both
    digests and the path, instead of stamping other weights' rows with the driver's model_sha."""
    from dollyflow.config import load_config
    from dollyflow.engine.infer import register_udf, resolve_spec

    model = tmp_path / "model"
    shutil.copytree(dolly_model_dir, model)
    _weights_last_byte(model, b"\x00")       # weights no Python worker of this session has loaded yet
    cfg = load_config("infer", [f"tables.warehouse={udf_cfg.tables.warehouse}", f"infer.model={model}",
                                "infer.max_new_tokens=4"])
    spec = resolve_spec(cfg.infer)
    _weights_last_byte(model, b"\x01")       # same size, other content
    stale = model_digest(str(model))
    assert stale != spec.digest
    register_udf(spark, spec, name="dolly_checked")
    spark.createDataFrame([("Name a colour.",)], "instruction string").createOrReplaceTempView("one_prompt")
    with pytest.raises(Exception) as failed:
        spark.sql("SELECT dolly_checked(instruction).response FROM one_prompt").collect()
    message = str(failed.value)
    assert f"the model weights at {model} (on this worker) have sha256 {stale}" in message
    assert f"weights with sha256 {spec.digest}" in message


def _small_project(spark, root, rows):
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore

    cfg = load_config("infer", [f"tables.warehouse={root / 'warehouse'}", "spark.shuffle_partitions=2"])
    store = DeltaStore(spark, cfg.tables)
    store.write(spark.createDataFrame(rows, SILVER_DDL), cfg.tables.silver, mode="overwrite")
    return store


def test_credentials_in_a_model_uri_never_reach_predictions_or_the_summary(spark, tmp_path, s3_bucket, s3_server,
                                                                          dolly_model_dir, dolly_records, capfd,
                                                                          monkeypatch):
    """A model on an object store with credentials in its URI: downloaded once into the (driver's,
    private) cache, which the Python workers on the same machine reuse; the URI is stored and
    printed redacted."""
    import tempfile

    from dollyflow.config import load_config, redact_uri
    from dollyflow.core.models.cache import CACHE_ENV
    from dollyflow.core.storage import upload_dir
    from dollyflow.jobs import infer

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))    # the driver's; the workers' env is their own
    uri = s3_bucket("s3", "models/dolly")
    secret = s3_server.secret_key
    assert f"{s3_server.access_key}:{secret}@" in uri
    upload_dir(dolly_model_dir, uri)
    store = _small_project(spark, tmp_path, silver_rows(dolly_records[:2]))
    out = infer.run(load_config("infer", [f"tables.warehouse={tmp_path / 'warehouse'}", "spark.shuffle_partitions=2",
                                          f"infer.model={uri}", "infer.split=all", "infer.max_new_tokens=4"]), spark)
    shown = redact_uri(uri)
    assert secret not in shown and shown.startswith("s3://***@dollyflow-test/models/dolly")
    assert out["generated"] == 2 and out["model"] == shown and out["model_source"]["kind"] == "uri"
    assert out["model_sha"] == model_digest(str(dolly_model_dir))
    assert {r["model"] for r in store.read("predictions").collect()} == {shown}
    assert secret not in json.dumps(out, default=str)
    assert secret not in capfd.readouterr().err
    # the workers used the driver's complete copy: nothing fetched into their default cache
    entry = Path(out["model_dir"]).relative_to(tmp_path / "cache").parts[0]
    assert not (Path(tempfile.gettempdir()) / f"dollyflow-models-{os.getuid()}" / entry).exists()


def test_the_test_split_is_the_one_the_model_was_trained_from(spark, tmp_path, dolly_model_dir, dolly_records):
    """The model's provenance names tokenized v0; tokenized has since moved to v1 with another
    split: the job scores v0's test records. A model trained from another tokenized table fails
    unless infer.split=all."""
    from dollyflow.config import load_config
    from dollyflow.jobs import infer

    rows = silver_rows(dolly_records[:6])
    ids = [r[0] for r in rows]
    store = _small_project(spark, tmp_path, rows)
    split = "record_id string, split string"
    store.write(spark.createDataFrame([(i, "test" if n < 2 else "train") for n, i in enumerate(ids)], split),
                "tokenized", mode="overwrite")
    store.write(spark.createDataFrame([(i, "test" if n >= 4 else "train") for n, i in enumerate(ids)], split),
                "tokenized", mode="overwrite")
    assert store.version("tokenized") == 1
    model = tmp_path / "model"
    shutil.copytree(dolly_model_dir, model)
    info = json.loads((model / "dollyflow_model.json").read_text())

    def provenance(location, version):
        info["dataset"] = {"tokenized_table": {"table": "tokenized", "location": location, "version": version}}
        (model / "dollyflow_model.json").write_text(json.dumps(info))

    provenance(store.location("tokenized"), 0)
    args = [f"tables.warehouse={tmp_path / 'warehouse'}", "spark.shuffle_partitions=2", f"infer.model={model}",
            "infer.max_new_tokens=4"]
    out = infer.run(load_config("infer", args), spark)
    assert sorted(r["record_id"] for r in store.read("predictions").collect()) == sorted(ids[:2])
    assert out["input"]["tokenized_version"] == 0 and out["input"]["tokenized_current_version"] == 1
    assert out["input"]["tokenized_from"] == "model provenance" and out["warnings"] == []
    provenance("/elsewhere/dollyflow/tokenized", 3)
    with pytest.raises(RuntimeError, match="trained from the tokenized table /elsewhere/dollyflow/tokenized .*"
                                           "infer.split=all"):
        infer.run(load_config("infer", args), spark)


# ---------------------------------------------------------------------------------------------
# train job -> infer job


@pytest.mark.slow
@pytest.mark.distributed
def test_a_model_the_train_job_wrote_runs_through_the_infer_job(spark, tmp_path, sample_path, tokenizer_path,
                                                                 dolly_records):
    """The real chain on the sample: tokenize -> train (tiny preset, 1 rank launched by torchrun,
    DeepSpeed ZeRO-2 on CPU, 8 epochs of 48 short records) -> the infer job on the test split it held out, reading the
    train job's output directory as it is (no fixture in between)."""
    pytest.importorskip("deepspeed")
    from dollyflow.config import load_config
    from dollyflow.core.training.model_dir import read_provenance
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import infer, tokenize, train

    warehouse = f"tables.warehouse={tmp_path / 'warehouse'}"
    cfg = load_config("tokenize", ["tokenize.source_table=silver", warehouse, "spark.shuffle_partitions=4", f"tokenize.tokenizer={tokenizer_path}",
                                   "tokenize.max_length=512", "tokenize.test_size=12", "tokenize.num_shards=1"],
                      preset="tiny")
    store = DeltaStore(spark, cfg.tables)
    # the 60 records with the shortest responses: ### End is then a frequent label, which a few
    # dozen steps of a random tiny model learn to emit
    short = sorted(dolly_records, key=lambda r: len(r["response"]))[:60]
    store.write(spark.createDataFrame(silver_rows(short), SILVER_DDL), cfg.tables.silver, mode="overwrite",
                job="test", run_id="test")
    tokenize.run(cfg, spark)

    trained = train.run(load_config("train", [warehouse, "train.launcher=torchrun", "train.processes=1",
                                              "train.epochs=8", "train.eval_steps=1000", "train.save_steps=1000",
                                              "train.mlflow=false"], preset="tiny"), spark)
    out = trained["output_dir"]
    assert not trained["skipped"] and trained["steps"] == 8 * 12 and trained["processes"] == 1   # 48 records / 4
    prov = read_provenance(out)
    assert prov["run_id"] == trained["run_id"]

    args = [warehouse, "spark.shuffle_partitions=4", f"infer.model={out}", "infer.max_new_tokens=32"]
    first = infer.run(load_config("infer", args), spark)
    assert first["rows_in"] == 12 and first["generated"] == 12 and first["already_predicted"] == 0
    assert first["model_sha"] == model_digest(out)
    # the test split is read at the tokenized version the train job recorded in the model
    assert first["input"]["tokenized_from"] == "model provenance" and first["warnings"] == []
    assert first["input"]["tokenized_version"] == prov["dataset"]["tokenized_table"]["version"]
    table = store.read("predictions").collect()
    assert len(table) == 12 and len({r["record_id"] for r in table}) == 12
    reasons = {r["finish_reason"] for r in table}
    assert reasons <= {"stop", "length"} and not any(r["error"] for r in table), [r["error"] for r in table]
    assert "stop" in reasons, [(r["finish_reason"], r["response"]) for r in table]   # it learned ### End
    assert all(0 < r["completion_tokens"] <= 32 and r["prompt_tokens"] > 0 for r in table)
    assert all(r["response"] is not None for r in table)
    for r in table:
        assert r["model"] == out and r["model_sha"] == first["model_sha"] and r["run_id"] == first["run_id"]
        info = json.loads(r["model_info"])      # the train job's provenance: its run and fingerprint
        assert info["run_id"] == trained["run_id"] and info["fingerprint"]["sha256"] == prov["fingerprint"]["sha256"]
        assert json.loads(r["params"])["max_new_tokens"] == 32
    # a rerun in append mode adds nothing
    again = infer.run(load_config("infer", args), spark)
    assert again["generated"] == 0 and again["already_predicted"] == 12
    assert store.read("predictions").count() == 12
    assert again["predictions_version"] == first["predictions_version"]
