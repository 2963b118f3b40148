"""The infer job and ``dolly_generate`` with ``infer.engine=ctranslate2`` (Spark, local[2], the tiny
trained Dolly model of conftest ``dolly_model_dir``): the same answers as the torch core, the same
error rows, predictions kept apart from the torch engine's, and the engine choice."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed: pip install "
                                                         "'dollyflow[ctranslate2]'")

from dollyflow.core.generation.generator import Generator  # noqa: E402
from dollyflow.core.generation.params import FINISH_ERROR, GenerationParams  # noqa: E402
from dollyflow.core.models.loading import load_for_generation  # noqa: E402

pytestmark = pytest.mark.spark

MAX_NEW = 24
LIB = Path(__file__).resolve().parents[2] / "lib"


@pytest.fixture(scope="module")
def torch_answers(dolly_model_dir, dolly_records):
    model, tok = load_for_generation(str(dolly_model_dir))
    recs = dolly_records[:24]
    out = Generator(model, tok, GenerationParams(max_new_tokens=MAX_NEW)).generate(
        [r["instruction"] for r in recs], [r["context"] for r in recs])
    return recs, out


def _cfg(root: Path, model_dir, *extra):
    from dollyflow.config import load_config
    return load_config("infer", [f"tables.warehouse={root / 'warehouse'}", f"infer.model={model_dir}",
                                 f"infer.max_new_tokens={MAX_NEW}", "infer.window_rows=8", *extra])


def test_sql_with_ctranslate2_gives_the_torch_cores_greedy_answers_and_its_error_rows(
        spark, tmp_path, dolly_model_dir, torch_answers):
    from dollyflow.engine.infer import register_udf

    recs, want = torch_answers
    register_udf(spark, _cfg(tmp_path, dolly_model_dir, "infer.engine=ctranslate2"), name="dolly_ct2")
    rows = [(i, r["instruction"], r["context"]) for i, r in enumerate(recs)]
    rows += [(100, None, "c"), (101, "   ", ""), (102, "Summarize.", "word " * 5000)]
    spark.createDataFrame(rows, "id int, instruction string, context string").repartition(3) \
        .createOrReplaceTempView("ct2_prompts")
    got = {r["id"]: r for r in spark.sql(
        "SELECT id, g.* FROM (SELECT id, dolly_ct2(instruction, context) AS g FROM ct2_prompts)").collect()}
    for i, w in enumerate(want):
        assert (got[i]["response"], got[i]["finish_reason"], got[i]["completion_tokens"], got[i]["prompt_tokens"]) \
            == (w.response, w.finish_reason, w.completion_tokens, w.prompt_tokens), i
    model, tok = load_for_generation(str(dolly_model_dir))
    bad = Generator(model, tok, GenerationParams(max_new_tokens=MAX_NEW)).generate(
        [None, "   ", "Summarize."], ["c", "", "word " * 5000])
    for i, w in zip((100, 101, 102), bad):
        assert (got[i]["finish_reason"], got[i]["error"], got[i]["trimmed_context_tokens"], got[i]["prompt_tokens"]) \
            == (w.finish_reason, w.error, w.trimmed_context_tokens, w.prompt_tokens), i
    assert got[100]["finish_reason"] == got[101]["finish_reason"] == FINISH_ERROR
    assert got[102]["trimmed_context_tokens"] > 0 and got[102]["response"] is not None


def test_job_records_the_engine_and_keeps_its_predictions_apart(spark, tmp_path, dolly_model_dir, dolly_records):
    from dollyflow.jobs import infer

    spark.createDataFrame([(i, r["instruction"], r["context"]) for i, r in enumerate(dolly_records[:12])],
                          "id int, instruction string, context string").createOrReplaceTempView("ct2_job_rows")
    base = ["infer.query=SELECT id, instruction, context FROM ct2_job_rows", "infer.key_columns=[id]"]
    torch_run = infer.run(_cfg(tmp_path, dolly_model_dir, *base), spark)
    ct2_run = infer.run(_cfg(tmp_path, dolly_model_dir, *base, "infer.engine=ctranslate2"), spark)
    int8_run = infer.run(_cfg(tmp_path, dolly_model_dir, *base, "infer.engine=ctranslate2",
                              "infer.compute_type=int8"), spark)
    assert torch_run["engine"] == "torch" and torch_run["params"] == GenerationParams(max_new_tokens=MAX_NEW).to_dict()
    assert ct2_run["params"] == dict(torch_run["params"], engine="ctranslate2", compute_type="float32")
    assert int8_run["params"]["compute_type"] == "int8" and int8_run["compute_type"] == "int8"
    # on CPUs: one task per executor (local[2]: one), a replica per core over one copy of the weights
    assert ct2_run["partitions"] == 1 and ct2_run["ct2_threads"] == 2 and torch_run["partitions"] == spark.sparkContext.defaultParallelism
    assert ct2_run["workers"]["tasks"] == 1
    assert len({torch_run["params_sha"], ct2_run["params_sha"], int8_run["params_sha"]}) == 3
    assert ct2_run["generated"] == int8_run["generated"] == 12         # nothing skipped as "already predicted"
    assert sum(int8_run["finish_reasons"].values()) == 12 and not int8_run["finish_reasons"].get("error")
    from dollyflow.engine.delta import DeltaStore
    table = DeltaStore(spark, _cfg(tmp_path, dolly_model_dir).tables).read("predictions").collect()
    assert len(table) == 36
    by = {}
    for r in table:
        by.setdefault(json.loads(r["params"]).get("engine", "torch") + json.loads(r["params"]).get(
            "compute_type", ""), {})[r["id"]] = r["response"]
    assert by["torch"] == by["ctranslate2float32"]          # greedy float32: the same text
    again = infer.run(_cfg(tmp_path, dolly_model_dir, *base, "infer.engine=ctranslate2"), spark)
    assert again["generated"] == 0 and again["already_predicted"] == 12


def test_engine_choice_without_the_package_and_bad_compute_types(tmp_path, dolly_model_dir):
    """Without ctranslate2: engine=ctranslate2 fails at once with the install hint, auto picks
    the torch core. float16 on the CPU is refused naming the key."""
    code = (f"import sys; sys.modules['ctranslate2'] = None\n"
            f"from dollyflow.engine.infer import resolve_engine\n"
            f"print(resolve_engine('auto', 'default', 'cpu', {str(dolly_model_dir)!r}))\n"
            f"try:\n    resolve_engine('ctranslate2', 'default', 'cpu', {str(dolly_model_dir)!r})\n"
            f"except ImportError as exc:\n    print('refused:', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(LIB), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "('torch', 'float32')"
    assert lines[1].startswith("refused:") and "dollyflow[ctranslate2]" in lines[1]
    from dollyflow.engine.infer import resolve_engine
    assert resolve_engine("auto", "default", "cpu", str(dolly_model_dir)) == ("ctranslate2", "float32")
    with pytest.raises(ValueError, match="infer.compute_type"):
        resolve_engine("ctranslate2", "float16", "cpu", str(dolly_model_dir))
    with pytest.raises(ValueError, match="infer.compute_type='int8' applies to infer.engine=ctranslate2 only"):
        resolve_engine("torch", "int8", "cpu", str(dolly_model_dir))
