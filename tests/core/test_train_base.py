"""The untrained base model beside a fine-tune (core/training/base.py): the train job's starting
point exactly, saved as a model directory infer can score, reused as it is on a rerun."""
from __future__ import annotations

import json

import pytest

from dollyflow.core.models.build import TINY_MODEL
from dollyflow.core.prompt import END_KEY
from dollyflow.core.shards import manifest_sha256, read_manifest
from dollyflow.core.shards.build import build_shard_dir
from dollyflow.core.tokens import load_tokenizer
from dollyflow.core.training.base import base_dir_for, write_base_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, dolly_records, tokenizer_path):
    d = tmp_path_factory.mktemp("base-shards") / "v0"
    build_shard_dir(dolly_records[:20], tokenizer_path, d, max_length=256, test_size=4,
                    source={"table": "silver", "version": 0})
    return str(d)


def test_the_base_is_the_train_jobs_starting_point_and_is_reused(shards, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from dollyflow.core.training.modeling import build_model

    manifest = read_manifest(shards)
    out = base_dir_for(str(tmp_path / "models" / "tiny-gpt-neox-full-12345678"), TINY_MODEL, manifest, 256)
    assert out.startswith(str(tmp_path / "models" / "tiny-gpt-neox-base-"))
    prov = write_base_model(TINY_MODEL, shards, out, 256)
    assert (prov["kind"], prov["trained"], prov["reused"], prov["base_model"]) == ("base", False, False, TINY_MODEL)
    assert prov["dataset"]["manifest_sha256"] == manifest_sha256(shards)
    assert prov["dataset"]["tokenized_table"] == manifest.get("tokenized_table")

    tok = load_tokenizer(shards + "/tokenizer")
    start = build_model(TINY_MODEL, len(tok), max_length=256).state_dict()     # what train starts from
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()                # what infer loads
    assert set(saved) == set(start) and saved
    assert all(torch.equal(saved[k], start[k]) for k in saved)
    gen = json.load(open(f"{out}/generation_config.json"))
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(END_KEY)
    assert load_tokenizer(out, dolly_tokens=False).convert_tokens_to_ids(END_KEY) == gen["eos_token_id"]

    # a rerun: the same directory, reused as it is (same weights, same model_sha for infer)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "models").rglob("*") if p.is_file()}
    again = write_base_model(TINY_MODEL, shards, out, 256)
    assert again["reused"] is True and again["key"] == prov["key"]
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "models").rglob("*")
                      if p.is_file()}
    # another max_length is another base (positions), in another directory
    assert base_dir_for(str(tmp_path / "models" / "x"), TINY_MODEL, manifest, 128) != out


def test_a_directory_holding_another_model_is_not_overwritten(shards, tmp_path, dolly_model_dir):
    with pytest.raises(RuntimeError, match="holds another model"):
        write_base_model(TINY_MODEL, shards, str(dolly_model_dir), 256)


def test_a_base_that_cannot_be_loaded_raises_naming_it(shards, tmp_path):
    missing = tmp_path / "no-such-model"
    missing.mkdir()         # a directory without config.json
    with pytest.raises(Exception) as e:
        write_base_model(str(missing), shards, str(tmp_path / "out"), 256)
    assert "no-such-model" in str(e.value) or "config.json" in str(e.value)
    assert not (tmp_path / "out" / "dollyflow_model.json").exists()
