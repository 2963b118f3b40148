"""The training loop on tiny Llama, Qwen2 and Mistral models in the chat format (one rank, CPU, in this
process): the first logged loss equals an independent Hugging Face forward on the same records with the
same labels (|diff| < 1e-5), with the output head applied to label positions only."""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from dollyflow.config import load_config  # noqa: E402
from dollyflow.core.models.build import tiny_causal_lm  # noqa: E402
from dollyflow.core.prompt_format import load_prompt_tokenizer  # noqa: E402
from dollyflow.core.shards import read_manifest  # noqa: E402
from dollyflow.core.shards.build import build_shard_dir  # noqa: E402
from dollyflow.core.training import batching  # noqa: E402
from dollyflow.core.training.data import split_records  # noqa: E402
from dollyflow.core.training.loop import train_main  # noqa: E402
from dollyflow.core.training.model_dir import METRICS, read_metrics, read_provenance  # noqa: E402
from dollyflow.core.training.modeling import HEAD_ON_LABELS_ONLY  # noqa: E402
from dollyflow.core.training.prepare import prepare  # noqa: E402
from dollyflow.testing.fixtures import chat_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_first_step_loss_equals_an_independent_hf_forward(arch, tmp_path, tokenizer_path, dolly_records):
    assert arch in HEAD_ON_LABELS_ONLY
    tok_dir = chat_tokenizer(tokenizer_path, tmp_path / "tok", "chatml")
    shard_dir = str(tmp_path / "shards")
    build_shard_dir(dolly_records[:40], tok_dir, shard_dir, max_length=512, test_size=4, num_shards=1,
                    prompt_format="chat_template")
    cfg = load_config("train", [f"tables.warehouse={tmp_path / 'wh'}", f"train.shard_dir={shard_dir}",
                                f"model.tokenizer={tok_dir}", "train.processes=1", "train.mlflow=false",
                                "train.progress=log", "train.max_steps=1", "train.batch_size=3",
                                "train.gradient_checkpointing=true"], preset=f"tiny-{arch}")
    plan = prepare(cfg)
    train_main(plan["spec"])
    (first,) = [e for e in read_metrics(os.path.join(plan["spec"].output_dir, METRICS)) if e["kind"] == "train"]

    tok, fmt = load_prompt_tokenizer(os.path.join(shard_dir, "tokenizer"), read_manifest(shard_dir))
    assert fmt.name == "chat_template"
    rec = split_records(shard_dir, "train")
    (idx,) = batching.train_batches(rec.length, seed=42, epoch=0, rank=0, batch_size=3, pad_to_multiple_of=8,
                                    group_size=64)[:1]
    batch = {k: torch.from_numpy(v) for k, v in rec.batch(idx, tok.pad_token_id, 8).items()}
    model = tiny_causal_lm(arch, len(tok), max_position_embeddings=512)
    out = model(**batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert first["label_tokens"] == n
    assert abs(first["loss"] - out.loss.item()) < 1e-5, (first["loss"], out.loss.item())
    prov = read_provenance(plan["spec"].output_dir)
    assert prov["prompt"] == {"format": "chat_template", "system": ""} and prov["architecture"] == arch.replace("_", "-")
