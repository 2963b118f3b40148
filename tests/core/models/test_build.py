"""The base model constructor: the tiny pythia-architecture model the tests and the local demo
train."""
import pytest

torch = pytest.importorskip("torch")

from dollyflow.core.models.build import load_model  # noqa: E402
from dollyflow.core.tokens import load_tokenizer  # noqa: E402


def test_tiny_model_runs_with_the_dolly_tokenizer(tiny_model_factory, tokenizer_path):
    tok = load_tokenizer(str(tokenizer_path))
    model = tiny_model_factory(len(tok))
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    ids = tok("### Instruction:\nSay hi.\n\n### Response:\n", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(out.loss)
    # same seed, same weights: runs are reproducible
    again = tiny_model_factory(len(tok))
    assert torch.equal(next(model.parameters()), next(again.parameters()))


def test_load_model_tiny_needs_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        load_model("tiny-gpt-neox")
