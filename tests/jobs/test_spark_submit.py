"""The spark-submit scripts through pyspark's real ``spark-submit`` on a local master, offline
(no --packages: the Delta backend falls back to delta-rs): ingest -> dedupe -> infer with the
tiny trained Dolly model of conftest ``dolly_model_dir``, each a separate spark-submit whose
driver and Python workers import this checkout's package."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPARK_SUBMIT = Path(sys.executable).with_name("spark-submit")

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def spark_submit(job: str, *overrides: str, cwd: Path) -> dict:
    """``spark-submit --master local[2] jobs/<job>.py key=value ...``; returns the job's summary."""
    if not SPARK_SUBMIT.is_file():
        pytest.skip(f"no spark-submit beside {sys.executable} (pyspark is not installed)")
    env = dict(os.environ)
    env["PYSPARK_PYTHON"] = env["PYSPARK_DRIVER_PYTHON"] = sys.executable   # driver and workers: this venv
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO / "lib"), env.get("PYTHONPATH", "")] if p)
    env.pop("PYSPARK_GATEWAY_PORT", None)
    env.pop("PYSPARK_GATEWAY_SECRET", None)
    cmd = [str(SPARK_SUBMIT), "--master", "local[2]", "--driver-memory", "2g",
           "--conf", "spark.sql.shuffle.partitions=4", "--conf", "spark.ui.enabled=false",
           str(REPO / "jobs" / f"{job}.py"), *overrides]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    start = done.stdout.find("\n{") + 1 if not done.stdout.startswith("{") else 0
    return json.loads(done.stdout[start:])


def delta_rows(path: str) -> list[dict]:
    from deltalake import DeltaTable
    return DeltaTable(path).to_pyarrow_table().to_pylist()


def test_ingest_dedupe_infer_through_spark_submit(tmp_path, sample_path, dolly_model_dir, dolly_records):
    pytest.importorskip("deltalake")
    wh = tmp_path / "warehouse"
    common = [f"tables.warehouse={wh}"]

    ingest = spark_submit("ingest", *common, f"ingest.input={sample_path}", cwd=tmp_path)
    assert ingest["backend"] == "offline" and "delta-rs" in ingest["backend_reason"]
    assert ingest["lines_read"] == len(dolly_records) == ingest["rows_new"] + ingest["rows_existing"] + \
        ingest["rows_quarantined"]
    bronze = delta_rows(ingest["bronze"])
    assert len(bronze) == ingest["rows_new"] > 0

    dedupe = spark_submit("dedupe", *common, cwd=tmp_path)
    silver = delta_rows(dedupe["silver"])
    assert 0 < len(silver) <= len(bronze)

    infer = spark_submit("infer", *common, f"infer.model={dolly_model_dir}", "infer.split=all", "infer.limit=6",
                         "infer.max_new_tokens=16", "infer.extra_columns=[instruction, context]",
                         "run_id=submit-infer", cwd=tmp_path)
    assert infer["generated"] == 6 and infer["rows_in"] == 6
    predictions = delta_rows(infer["predictions"])
    assert len(predictions) == 6 and {p["run_id"] for p in predictions} == {"submit-infer"}
    # the rows scored are the first 6 silver record_ids, answered as the engine-free core answers them
    assert sorted(p["record_id"] for p in predictions) == sorted(r["record_id"] for r in silver)[:6]
    from dollyflow.core.generation.generator import Generator
    from dollyflow.core.generation.params import GenerationParams
    from dollyflow.core.models.loading import load_for_generation
    model, tok = load_for_generation(str(dolly_model_dir))
    want = Generator(model, tok, GenerationParams(max_new_tokens=16)).generate(
        [p["instruction"] for p in predictions], [p["context"] for p in predictions])
    for p, w in zip(predictions, want):
        assert (p["response"], p["finish_reason"], p["completion_tokens"]) == \
            (w.response, w.finish_reason, w.completion_tokens)
