"""``evaluate.baseline=base`` in ``dollyflow pipeline`` without Spark: when the base model cannot
be had the pipeline says why, records the base infer as skipped and goes on with the fine-tune
alone; after both infers evaluate compares base (A) with fine-tune (B) unless evaluate.models says
otherwise. (The two infers and evaluate's two sides end to end: tests/app/test_pipeline.py.)"""
from __future__ import annotations

import pytest

from dollyflow.config import ConfigError, load_config
from dollyflow.core.shards.build import build_shard_dir
from dollyflow.pipeline import BASE_KEY, baseline_infer, compare_with_base


def _cfg(*overrides):
    return load_config("pipeline", ["evaluate.baseline=base", *overrides], preset="tiny")


def _run(cfg, record):
    said, steps = [], []
    ok = baseline_infer(cfg, record, 5, lambda *a: steps.append(a) or True, said.append)
    return ok, said, steps


def test_no_train_run_means_no_base(tmp_path):
    cfg = _cfg(f"tables.warehouse={tmp_path}", f"infer.model={tmp_path}")
    record = {"jobs": {"train": {"status": "skipped", "summary": {"skipped": "..."}}}}
    ok, said, steps = _run(cfg, record)
    assert ok and not steps
    assert said == ["[5/7] infer (base) skipped: no train run in this pipeline to take the base model from; "
                    "evaluating the fine-tune alone"]
    assert record["jobs"][BASE_KEY]["status"] == "skipped"


def test_infer_of_another_model_has_no_known_base(tmp_path):
    cfg = _cfg(f"infer.model={tmp_path / 'someone-elses'}")
    record = {"jobs": {"train": {"summary": {"output_dir": str(tmp_path / "mine"), "shard_dir": str(tmp_path)}}}}
    ok, said, steps = _run(cfg, record)
    assert ok and not steps and "is not the model this run trained" in said[0]


def test_a_base_that_cannot_be_loaded_is_said_and_the_run_goes_on(tmp_path, dolly_records, tokenizer_path):
    shards = tmp_path / "shards"
    build_shard_dir(dolly_records[:12], tokenizer_path, shards, max_length=256, test_size=2)
    missing = tmp_path / "no-such-base"
    missing.mkdir()                          # stands for a hub name without network: loading fails
    out = tmp_path / "models" / "tiny-gpt-neox-full-abcdef12"
    cfg = _cfg(f"model.name={missing}", f"infer.model={out}")
    record = {"jobs": {"train": {"summary": {"output_dir": str(out), "shard_dir": str(shards)}}}}
    ok, said, steps = _run(cfg, record)
    assert ok and not steps and cfg.infer.model == str(out)
    assert f"the base model {missing} cannot be had" in said[0] and said[0].endswith("evaluating the fine-tune alone")
    assert record["jobs"][BASE_KEY]["summary"]["skipped"] in said[0]


def test_evaluate_compares_base_with_the_fine_tune_unless_models_are_named():
    infer = {"model_sha": "b" * 64, "params_sha": "1234abcd"}
    base = {"model_sha": "a" * 64, "params_sha": "1234abcd"}
    record = {"jobs": {BASE_KEY: {"status": "changed", "summary": base}, "infer": {"summary": infer}}}
    cfg = _cfg()
    compare_with_base(cfg, record, print)
    assert (cfg.evaluate.models, cfg.evaluate.params_sha) == (["a" * 64, "b" * 64], ["1234abcd"])
    cfg = _cfg("evaluate.models=[cafebabe12]")
    compare_with_base(cfg, record, print)
    assert (cfg.evaluate.models, cfg.evaluate.params_sha) == (["cafebabe12"], [])
    said = []                                # the base skipped: one side
    record["jobs"][BASE_KEY] = {"status": "skipped", "summary": {"skipped": "no network"}}
    cfg = _cfg()
    compare_with_base(cfg, record, said.append)
    assert cfg.evaluate.models == [] and not said


def test_baseline_is_validated():
    with pytest.raises(ConfigError, match="evaluate.baseline: must be one of none, base, got 'fine'"):
        load_config("pipeline", ["evaluate.baseline=fine"], preset="tiny")
    assert load_config("pipeline", [], preset="tiny").evaluate.baseline == "none"
