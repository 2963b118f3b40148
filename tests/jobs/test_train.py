"""The train job end to end: the tokenize job's shards of the real sample, the tiny model, 2 CPU
ranks with DeepSpeed ZeRO-2 over gloo, launched by TorchDistributor on local Spark (and torchrun).

Resume tolerance: the losses after resuming must equal the uninterrupted run's exactly as
floats to 1e-9 (same process count, fp32 on CPU, deterministic kernels: in practice bit-equal)."""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from dollyflow.config import DOLLY_CATEGORIES, load_config  # noqa: E402
from dollyflow.core.records import record_id  # noqa: E402
from dollyflow.core.training import checkpoint  # noqa: E402
from dollyflow.core.training.model_dir import METRICS, read_metrics, read_provenance  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.distributed]

HERE = Path(__file__).resolve().parent
SILVER_DDL = ("record_id string, instruction string, context string, response string, category string, "
              "source_file string, source_line long, ingested_at timestamp, run_id string")
RESUME_TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def shards(spark, sample_path, tokenizer_path, tmp_path_factory):
    """The sample as a silver table and one tokenize run over it (3 shards per split)."""
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import tokenize

    root = tmp_path_factory.mktemp("train")
    cfg = load_config("tokenize", ["tokenize.source_table=silver", f"tables.warehouse={root / 'warehouse'}", "spark.shuffle_partitions=4",
                                   f"tokenize.tokenizer={tokenizer_path}", "tokenize.max_length=512",
                                   "tokenize.test_size=16", "tokenize.num_shards=3"], preset="tiny")
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    for n, line in enumerate(open(sample_path, encoding="utf-8"), 1):
        r = json.loads(line)
        rows.append((record_id(r["instruction"], r.get("context") or "", r["response"], r["category"]),
                     r["instruction"], r.get("context") or "", r["response"], r["category"], str(sample_path), n,
                     now, "test"))
    store = DeltaStore(spark, cfg.tables)
    version = store.write(spark.createDataFrame(rows, SILVER_DDL), "silver", mode="overwrite", job="test",
                          run_id="test")
    summary = tokenize.run(cfg, spark)
    return {"root": root, "warehouse": root / "warehouse", "summary": summary, "silver_version": version}


def train_cfg(shards, *overrides):
    return load_config("train", [f"tables.warehouse={shards['warehouse']}", *overrides], preset="tiny")


@pytest.fixture
def rank_fns_on_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def trained(spark, shards):
    """The uninterrupted run: TorchDistributor (local mode), 2 ranks, ZeRO-2, MLflow on."""
    from dollyflow.jobs import train

    cfg = train_cfg(shards)
    summary = train.run(cfg, spark)
    return {"cfg": cfg, "summary": summary, "out": Path(summary["output_dir"])}


def train_entries(out: Path) -> list[dict]:
    return [e for e in read_metrics(str(out / METRICS)) if e["kind"] == "train"]


def test_two_ranks_zero2_loss_falls_eval_per_category_checkpoints(trained, shards):
    s, out = trained["summary"], trained["out"]
    assert s["launcher"] == "torch_distributor" and s["processes"] == 2 and not s["skipped"]
    assert s["zero_stage"] == 2 and s["deepspeed_preset"] == "cpu" and s["precision"] == "fp32"
    assert s["shard_dir"] == shards["summary"]["shard_dir"]          # the root's LATEST.json, resolved
    assert out.name == f"tiny-gpt-neox-full-{s['manifest_sha256'][:8]}"
    assert s["steps"] >= 30 and len(s["peak_rss_mb"]) == 2
    train = train_entries(out)
    assert [e["step"] for e in train] == list(range(1, s["steps"] + 1))
    first, last = sum(e["loss"] for e in train[:3]) / 3, sum(e["loss"] for e in train[-3:]) / 3
    assert last < first - 1.0, (first, last)
    evals = [e for e in read_metrics(str(out / METRICS)) if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [*range(10, s["steps"], 10), s["steps"]]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    per_cat = s["eval_loss_per_category"]
    assert per_cat and set(per_cat) <= set(DOLLY_CATEGORIES)
    assert sum(d["records"] for d in per_cat.values()) == 16
    assert all(set(e["eval_loss_per_category"]) == set(per_cat) for e in evals)
    # every 10 steps, the last two kept
    ckpts = checkpoint.list_checkpoints(s["checkpoint_dir"])
    last_save = (s["steps"] - 1) // 10 * 10
    assert [c.step for c in ckpts] == [last_save - 10, last_save] and all(c.complete for c in ckpts)
    files = ["mp_rank_00_model_states.pt", "rng-rank0.json", "rng-rank0.safetensors", "rng-rank1.json",
             "rng-rank1.safetensors", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(os.listdir(ckpts[-1].path)) == sorted([".dollyflow-checkpoint.json", "complete.json", *files])
    assert sorted(ckpts[-1].info["files"]) == files      # each with its sha256, checked before a resume
    assert not (out / ".runs").exists()


def test_mlflow_run_has_params_metrics_tags_and_the_model_card(trained, shards):
    from mlflow.tracking import MlflowClient

    s = trained["summary"]
    client = MlflowClient(tracking_uri="file:" + str(shards["warehouse"].resolve() / "mlruns"))
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.003" and run.data.params["processes"] == "2"
    assert run.data.tags["dataset.table"] == "silver"
    assert run.data.tags["dataset.version"] == str(shards["silver_version"])
    assert run.data.tags["dataset.manifest_sha256"] == s["manifest_sha256"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == s["steps"]
    assert {"eval_loss", "useful_tokens_per_s"} <= set(run.data.metrics)
    assert any(k.startswith("eval_loss.") for k in run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"README.md", "dollyflow_model.json", "metrics.jsonl", "loss_curve.png"} <= names
    assert s["mlflow"]["model_logged"], s["mlflow"]["model_error"]       # the transformers flavour
    assert s["mlflow"]["model_uri"].startswith("models:/")


def test_train_runs_row(trained, spark):
    from dollyflow.engine.delta import DeltaStore

    s, cfg = trained["summary"], trained["cfg"]
    rows = DeltaStore(spark, cfg.tables).read("train_runs").where(f"run_id = '{cfg.run_id}'").collect()
    (r,) = rows
    assert r["skipped"] is False and r["steps"] == s["steps"] and r["processes"] == 2
    assert r["manifest_sha256"] == s["manifest_sha256"] and r["source_table"] == "silver"
    assert r["mlflow_run_id"] == s["mlflow_run_id"] and r["useful_tokens_per_s"] > 0
    assert set(r["eval_loss_per_category"]) == set(s["eval_loss_per_category"])


def test_output_dir_loads_generates_and_stops_at_end(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dollyflow.core.prompt import format_inference_prompt

    out = str(trained["out"])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    end = tok.convert_tokens_to_ids("### End")
    assert model.generation_config.eos_token_id == end
    assert model.generation_config.pad_token_id == tok.eos_token_id == tok.pad_token_id
    assert model.get_input_embeddings().num_embeddings == len(tok)
    prompt = tok(format_inference_prompt("Give me three colours."), return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**prompt, do_sample=False, max_new_tokens=100)
    new = gen[0, prompt["input_ids"].shape[1]:].tolist()
    assert new[-1] == end and len(new) < 100, tok.decode(new)
    prov = read_provenance(out)
    assert prov["dataset"]["manifest_sha256"] == trained["summary"]["manifest_sha256"]
    assert prov["dataset"]["source"]["table"] == "silver" and prov["eval_loss_per_category"]
    assert all(len(s["sha256"]) == 64 for s in prov["dataset"]["shards"])
    card = (trained["out"] / "README.md").read_text()
    assert "Eval loss per category" in card and prov["fingerprint"]["sha256"] in card


def test_rerun_is_a_noop_and_another_config_fails_naming_it(trained, shards, spark):
    from dollyflow.core.training.prepare import OutputConflict
    from dollyflow.jobs import train

    out = trained["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = train.run(train_cfg(shards), spark)
    assert again["skipped"] and again["decision"] == "skip"
    assert again["eval_loss"] == trained["summary"]["eval_loss"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(OutputConflict, match=r"train\.learning_rate: 0\.003 -> 0\.001"):
        train.run(train_cfg(shards, "train.learning_rate=0.001"), spark)


def test_kill_after_checkpoint_then_resume_equals_uninterrupted(trained, shards, spark, tmp_path, rank_fns_on_path):
    from dollyflow.jobs import train
    from dollyflow.launch.common import TrainingFailed

    out = tmp_path / "resumed"
    with pytest.raises(TrainingFailed, match="without a rank's error record"):
        train.run(train_cfg(shards, f"train.output_dir={out}", "train.launcher=torchrun"), spark,
                  fn="train_rank_fns:kill_after_first_checkpoint")
    ckpts = checkpoint.list_checkpoints(str(out / "checkpoints"))
    assert [(c.step, c.complete) for c in ckpts] == [(10, True)]
    assert read_provenance(str(out)) is None
    # a checkpoint the kill cut short (started, no completion marker) must never be picked
    half = out / "checkpoints" / checkpoint.tag(20)
    checkpoint.mark_started(str(half), {"step": 20})
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")

    # a truncated or tampered checkpoint file is refused by name (sizes on the driver before
    # anything is launched, sha256 on the ranks before DeepSpeed loads anything)
    victim = out / "checkpoints" / checkpoint.tag(10) / "mp_rank_00_model_states.pt"
    original = victim.read_bytes()
    victim.write_bytes(original[:-100])
    with pytest.raises(checkpoint.CheckpointError, match=r"step-00000010/mp_rank_00_model_states.pt: \d+ bytes, "
                                                         r"\d+ when it was written \(truncated"):
        train.run(train_cfg(shards, f"train.output_dir={out}"), spark)
    victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(TrainingFailed, match=r"CheckpointError: checkpoint .* is refused: "
                                             r"step-00000010/mp_rank_00_model_states.pt: sha256 differs"):
        train.run(train_cfg(shards, f"train.output_dir={out}"), spark)
    victim.write_bytes(original)

    resumed = train.run(train_cfg(shards, f"train.output_dir={out}"), spark)
    assert resumed["decision"] == "resume" and resumed["resumed_from"] == 10
    # the torn step-20 was removed, not loaded; step 20 now is this run's complete checkpoint
    (c20,) = [c for c in checkpoint.list_checkpoints(str(out / "checkpoints")) if c.step == 20]
    assert c20.complete and c20.info["run_id"] == resumed["run_id"]
    a, b = train_entries(trained["out"]), train_entries(out)
    assert [e["step"] for e in a] == [e["step"] for e in b]
    assert [e["data_digest"] for e in a] == [e["data_digest"] for e in b]       # same data order
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= RESUME_TOLERANCE, (x["step"], x["loss"], y["loss"])
        assert x["lr"] == y["lr"]
    assert abs(resumed["eval_loss"] - trained["summary"]["eval_loss"]) <= RESUME_TOLERANCE


def test_a_failing_rank_fails_the_job_with_its_message(shards, spark, tmp_path, rank_fns_on_path):
    from dollyflow.jobs import train
    from dollyflow.launch.common import TrainingFailed

    with pytest.raises(TrainingFailed, match=r"rank 1 failed: ValueError: injected failure on rank 1 at step 2") as e:
        train.run(train_cfg(shards, f"train.output_dir={tmp_path / 'fail'}", "train.mlflow=false"), spark,
                  fn="train_rank_fns:fail_on_rank_1")
    assert e.value.rank == 1 and "train_rank_fns.py" in str(e.value)


def test_a_corrupted_shard_fails_before_anything_is_launched(shards, spark, tmp_path):
    from dollyflow.core.training.errors import ShardCheckError
    from dollyflow.jobs import train

    bad = tmp_path / "shards"
    shutil.copytree(shards["summary"]["shard_dir"], bad)
    victim = sorted(bad.glob("train-*.parquet"))[1]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    victim.write_bytes(bytes(data))
    out = tmp_path / "never"
    with pytest.raises(ShardCheckError, match=f"{victim.name}: sha256 differs"):
        train.run(train_cfg(shards, f"train.shard_dir={bad}", f"train.output_dir={out}"), spark)
    assert not out.exists()


def test_horovod_launcher(shards, spark, tmp_path):
    """Runs where horovod imports (scripts/build_horovod.sh builds 0.28.1); CI without it skips."""
    from dollyflow.launch.horovod import available
    ok, why = available()
    if not ok:
        pytest.skip(why)
    from dollyflow.jobs import train

    out = tmp_path / "horovod"
    s = train.run(train_cfg(shards, "train.launcher=horovod", f"train.output_dir={out}", "train.max_steps=4",
                            "train.mlflow=false"), spark)
    assert s["launcher"] == "horovod" and s["steps"] == 4 and s["processes"] == 2
    assert len(train_entries(out)) == 4 and read_provenance(str(out))["launcher"] == "horovod"


# ---- issue 18: the trained model and its checkpoints are safe by default


def test_without_spark_torchrun_starts_the_ranks_and_no_row_is_written(shards, spark, tmp_path):
    """``dollyflow train --no-spark`` and ``python -m dollyflow.launch.torchrun``: the ranks on
    this machine with torchrun whatever train.launcher says, no ``train_runs`` row."""
    from dollyflow.jobs import train

    rows = _runs_rows(spark, shards)
    out = tmp_path / "no-spark"
    s = train.run_without_spark(train_cfg(shards, f"train.output_dir={out}", "train.processes=1",
                                          "train.max_steps=2", "train.mlflow=false", "train.launcher=horovod"))
    assert s["launcher"] == "torchrun" and s["steps"] == 2 and not s["skipped"] and "train_runs" not in s
    assert read_provenance(str(out))["launcher"] == "torchrun" and len(train_entries(out)) == 2
    assert _runs_rows(spark, shards) == rows


def test_overwrite_with_the_same_fingerprint_is_a_noop(trained, shards, spark):
    from dollyflow.jobs import train

    out = trained["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = train.run(train_cfg(shards, "train.overwrite=true"), spark)   # the bundle's default
    assert again["skipped"] and again["decision"] == "skip"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before   # no checkpoint or file touched


def test_a_folder_that_merely_holds_checkpoints_and_metrics_is_never_removed(shards, spark, tmp_path):
    from dollyflow.core.training.prepare import OutputConflict
    from dollyflow.jobs import train

    out = tmp_path / "experiments"                      # a user's folder, not a dollyflow model
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "mine.ckpt").write_bytes(b"user data")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(OutputConflict, match="not empty and not a dollyflow model directory"):
        train.run(train_cfg(shards, f"train.output_dir={out}", "train.overwrite=true"), spark)
    assert (out / "checkpoints" / "mine.ckpt").read_bytes() == b"user data"
    assert (out / "metrics.jsonl").read_text() == '{"mine": 1}\n'


def test_a_second_train_job_on_one_output_dir_fails_at_once_naming_the_first(trained, shards, spark):
    from dollyflow.core.training.lease import Lease, OutputLocked
    from dollyflow.jobs import train

    with Lease(str(trained["out"]), "job-42-train"):       # a train job running right now
        with pytest.raises(OutputLocked, match=r"in use by run 'job-42-train' on host"):
            train.run(train_cfg(shards, "train.overwrite=true", "train.learning_rate=0.001"), spark)
    assert read_provenance(str(trained["out"]))["run_id"] == trained["summary"]["run_id"]


def _runs_rows(spark, shards) -> int:
    from dollyflow.engine.delta import DeltaStore
    cfg = train_cfg(shards)
    store = DeltaStore(spark, cfg.tables)
    return store.count(cfg.tables.train_runs) if store.exists(cfg.tables.train_runs) else 0


def test_overwrite_trains_beside_the_old_model_and_swaps_it_in_keeping_the_users_files(
        trained, shards, spark, tmp_path, rank_fns_on_path, monkeypatch):
    from dollyflow.jobs import train

    out = tmp_path / "model"
    shutil.copytree(trained["out"], out)
    old_fp = read_provenance(str(out))["fingerprint"]["sha256"]
    (out / "my-notes.txt").write_text("the user's own file")
    old_ckpts = [c.tag for c in checkpoint.list_checkpoints(str(out / "checkpoints"))]
    assert old_ckpts
    watch = tmp_path / "watch.json"
    monkeypatch.setenv("DOLLYFLOW_TEST_WATCH", str(watch))
    s = train.run(train_cfg(shards, f"train.output_dir={out}", "train.overwrite=true", "train.launcher=torchrun",
                            "train.processes=1", "train.max_steps=4", "train.learning_rate=0.002",
                            "spark.conf={spark.hadoop.fs.s3a.secret.key: TOPSECRET}"),
                  spark, fn="train_rank_fns:watch_old_model")
    seen = json.loads(watch.read_text())
    # while the new model trained, the old one was complete and readable where it always was
    assert seen["old_fingerprint"] == old_fp and seen["old_weights"]
    assert seen["target"] != str(out) and os.path.dirname(seen["target"]) == str(tmp_path)
    assert seen["spec_mode"] == "0o600" and not seen["spec_has_secret"]
    prov = read_provenance(str(out))
    assert s["decision"] == "fresh" and s["output_dir"] == str(out) and prov["fingerprint"]["sha256"] == s["fingerprint"]
    assert prov["fingerprint"]["sha256"] != old_fp and prov["metrics"]["steps"] == 4
    assert (out / "my-notes.txt").read_text() == "the user's own file" and s["replaced"]["carried"] == ["my-notes.txt"]
    assert "my-notes.txt" not in prov["files"] and "model.safetensors" in prov["files"]
    # the old model's checkpoints went with it; nothing is left beside the directory
    assert [c.tag for c in checkpoint.list_checkpoints(str(out / "checkpoints"))
            if c.info and c.info.get("fingerprint") == old_fp] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "watch.json"]
    # no secret in anything written: the model directory and MLflow's store
    for root in (out, shards["warehouse"] / "mlruns"):
        for p in root.rglob("*"):
            if p.is_file() and p.stat().st_size < 5_000_000:
                assert b"TOPSECRET" not in p.read_bytes(), p
    assert json.loads((out / "training_config.json").read_text())["spark"]["conf"] == \
        {"spark.hadoop.fs.s3a.secret.key": "***"}


def test_a_nan_loss_stops_naming_the_step_and_a_failed_retrain_keeps_the_old_model(
        trained, shards, spark, tmp_path):
    from dollyflow.core.training.prepare import prepare
    from dollyflow.jobs import train
    from dollyflow.launch.common import TrainingFailed

    out = tmp_path / "model"
    shutil.copytree(trained["out"], out)
    weights = (out / "model.safetensors").read_bytes()
    rows = _runs_rows(spark, shards)
    overrides = [f"train.output_dir={out}", "train.overwrite=true", "train.launcher=torchrun", "train.processes=1",
                 "train.max_steps=6", "train.learning_rate=1e30", "train.warmup_steps=0", "train.mlflow=false"]
    with pytest.raises(TrainingFailed, match=r"NonFiniteLoss: the training loss is (nan|inf) at step \d+ \(epoch 1\)"):
        train.run(train_cfg(shards, *overrides), spark)
    # the old model is untouched and still the one at train.output_dir; no success row
    assert (out / "model.safetensors").read_bytes() == weights
    assert read_provenance(str(out))["run_id"] == trained["summary"]["run_id"]
    assert _runs_rows(spark, shards) == rows
    # the half-trained replacement beside it is not a finished model: a rerun trains, never skips
    (sibling,) = [p for p in tmp_path.iterdir() if p.name.startswith(".model.next-")]
    assert read_provenance(str(sibling)) is None
    plan = prepare(train_cfg(shards, *overrides))
    assert plan["decision"] == "fresh" and plan["target_dir"] == str(sibling)
