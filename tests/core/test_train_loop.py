"""The training loop in this process (one rank, CPU, tiny model, the real sample; no Spark).

Exact-loss checks in torchtune's style: the loop's first logged loss equals an independent
Hugging Face forward on the same records with the same labels (|diff| < 1e-5)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from dollyflow.config import load_config  # noqa: E402
from dollyflow.core.models.build import tiny_gpt_neox  # noqa: E402
from dollyflow.core.tokens import load_tokenizer  # noqa: E402
from dollyflow.core.training import batching  # noqa: E402
from dollyflow.core.shards.build import build_shard_dir  # noqa: E402
from dollyflow.core.training.data import split_records  # noqa: E402
from dollyflow.core.training.errors import ShardCheckError  # noqa: E402
from dollyflow.core.training.loop import train_main  # noqa: E402
from dollyflow.core.training.model_dir import METRICS, read_metrics, read_provenance  # noqa: E402
from dollyflow.core.training.prepare import prepare  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, sample_path, tokenizer_path):
    out = tmp_path_factory.mktemp("shards") / "v1"
    records = [json.loads(line) for line in open(sample_path, encoding="utf-8")]
    build_shard_dir(records, tokenizer_path, out, max_length=512, test_size=10, num_shards=2)
    return str(out)


def spec_for(tmp_path, shard_dir, *overrides):
    cfg = load_config("train", [f"tables.warehouse={tmp_path / 'wh'}", f"train.shard_dir={shard_dir}",
                                "train.processes=1", "train.mlflow=false", "train.progress=log", *overrides],
                      preset="tiny")
    plan = prepare(cfg)
    assert plan["decision"] == "fresh"
    return plan["spec"]


def hf_loss_sum(model, batch):
    out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    n = int((batch["labels"][:, 1:] != -100).sum())
    return out.loss.item() * n, n


def test_first_step_loss_equals_an_independent_hf_forward(tmp_path, shard_dir):
    spec = spec_for(tmp_path, shard_dir, "train.max_steps=1", "train.batch_size=3", "train.grad_accum=2")
    summary = train_main(spec)
    (first,) = [e for e in read_metrics(os.path.join(spec.output_dir, METRICS)) if e["kind"] == "train"]

    tok = load_tokenizer(os.path.join(shard_dir, "tokenizer"))
    rec = split_records(shard_dir, "train")
    plan = batching.train_batches(rec.length, seed=42, epoch=0, rank=0, batch_size=3, pad_to_multiple_of=8,
                                  group_size=64)
    model = tiny_gpt_neox(len(tok), max_position_embeddings=512)
    total, count = 0.0, 0
    for idx in plan[:2]:                                # two micro-batches of one optimizer step
        batch = rec.batch(idx, tok.pad_token_id, 8)
        assert batch["input_ids"].shape[1] % 8 == 0
        s, n = hf_loss_sum(model, batch)
        total, count = total + s, count + n
    assert abs(first["loss"] - total / count) < 1e-5, (first["loss"], total / count)
    assert first["label_tokens"] == count
    ids = ",".join(rec.record_id[int(j)] for b in plan[:2] for j in b)
    assert first["data_digest"] == hashlib.sha256(ids.encode()).hexdigest()[:16]
    assert summary["metrics"]["steps"] == 1 and summary["weights"] == "full"


def test_labels_cover_only_the_response_and_end(shard_dir):
    tok = load_tokenizer(os.path.join(shard_dir, "tokenizer"))
    rec = split_records(shard_dir, "train")
    batch = rec.batch([0, 1, 2], tok.pad_token_id, 8)
    resp = tok.convert_tokens_to_ids("### Response:\n")
    end = tok.convert_tokens_to_ids("### End")
    for r in range(3):
        ids, labels, mask = batch["input_ids"][r], batch["labels"][r], batch["attention_mask"][r]
        n = int(mask.sum())
        start = int(np.where(ids == resp)[0][0]) + 1
        assert (labels[:start] == -100).all() and (labels[n:] == -100).all()
        assert (labels[start:n] == ids[start:n]).all() and ids[n - 1] == end
        assert (ids[n:] == tok.eos_token_id).all()


def test_corrupted_shard_fails_before_step_one(tmp_path, shard_dir):
    spec = spec_for(tmp_path, shard_dir, "train.max_steps=2")
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    shard = sorted(bad.glob("train-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    spec = dataclasses.replace(spec, shard_dir=str(bad))
    with pytest.raises(ShardCheckError, match=f"{shard.name}: sha256 differs from the manifest"):
        train_main(spec)
    assert not os.path.exists(os.path.join(spec.output_dir, METRICS))


def test_lora_adapter_reloads_with_peft_and_merged_with_transformers(tmp_path, shard_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    spec = spec_for(tmp_path, shard_dir, "train.method=lora", "train.epochs=1", "train.learning_rate=0.01",
                    "train.lora_r=4", "train.lora_save=both")
    summary = train_main(spec)
    m = summary["metrics"]
    assert m["trainable_parameters"] < m["parameters"] / 10
    assert m["train_loss"] < m["train_loss_first"]
    out = spec.output_dir
    assert summary["weights"] == "merged" and summary["adapter_dir"] == os.path.join(out, "adapter")
    assert read_provenance(out)["method"] == "lora"

    tok = load_tokenizer(out)
    base = tiny_gpt_neox(len(tok), max_position_embeddings=512)        # the same seeded base weights
    base_embed = base.get_input_embeddings().weight.detach().clone()
    base_head = base.get_output_embeddings().weight.detach().clone()
    with_adapter = peft.PeftModel.from_pretrained(base, summary["adapter_dir"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok("### Instruction:\nName a colour.\n\n### Response:\nBlue\n\n### End")["input_ids"]])
    with torch.no_grad():
        a, b = with_adapter(ids).logits, merged(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # Dolly's added tokens were trained (their rows moved), the others were not: every new row of
    # the output head (softmax gives them all a gradient), and the input rows of the tokens that
    # occur as inputs (### End is always last: nothing is predicted from it)
    new = [tok.convert_tokens_to_ids(t) for t in ("### End", "### Instruction:", "### Response:\n")]
    head = (merged.get_output_embeddings().weight.detach() - base_head).abs().sum(dim=1)
    assert sorted(torch.nonzero(head).flatten().tolist()) == sorted(new)
    embed = (merged.get_input_embeddings().weight.detach() - base_embed).abs().sum(dim=1)
    assert sorted(torch.nonzero(embed).flatten().tolist()) == sorted(new[1:])


def test_shards_of_another_tokenizer_fail_before_training_naming_both_sizes(tmp_path, shard_dir, sample_path):
    """Issue 18: the shards' tokenizer must be the base model's (plus Dolly's added tokens)."""
    from dollyflow.core.tokens import train_small_tokenizer
    from dollyflow.core.training.prepare import TokenizerMismatch, check_tokenizer

    texts = [json.loads(line)["response"][::-1] for line in open(sample_path, encoding="utf-8")]
    train_small_tokenizer(texts, tmp_path / "other-tok", vocab_size=300)
    other = load_tokenizer(tmp_path / "other-tok", dolly_tokens=False)
    base = tmp_path / "base-model"                       # a base model by path, with a tokenizer of its own
    tiny_gpt_neox(len(other), max_position_embeddings=512).save_pretrained(base)
    other.save_pretrained(base)
    n_shard = len(load_tokenizer(os.path.join(shard_dir, "tokenizer"), dolly_tokens=False))
    out = tmp_path / "out"
    cfg = load_config("train", [f"tables.warehouse={tmp_path / 'wh'}", f"train.shard_dir={shard_dir}",
                                f"train.output_dir={out}", "train.processes=1", "train.mlflow=false",
                                f"model.name={base}", "model.tokenizer=''"], preset="tiny")
    with pytest.raises(TokenizerMismatch, match=(rf"tokenized with a {n_shard:,}-token vocabulary, but the base "
                                                 rf"model .* has {len(other):,} tokens \({len(other) + 3:,} with")):
        prepare(cfg)
    assert not out.exists()                              # nothing written, nothing launched
    # the model's own tokenizer with Dolly's three tokens added: accepted
    model_cfg = {"name": str(base), "tokenizer": str(tmp_path / "other-tok")}
    from dollyflow.core.shards.build import build_shard_dir
    records = [json.loads(line) for line in open(sample_path, encoding="utf-8")][:20]
    mine = tmp_path / "own-shards"
    build_shard_dir(records, tmp_path / "other-tok", mine, max_length=512, test_size=2, num_shards=1)
    assert check_tokenizer(str(mine), model_cfg) == {"checked": True, "shard_tokens": len(other) + 3,
                                                     "model_tokens": len(other)}
