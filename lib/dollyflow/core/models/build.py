"""The base causal LM a run starts from: pythia (or any causal LM) by hub name or path, or
``tiny-gpt-neox``, a pythia-architecture model with random weights for laptops and tests
(:func:`load_model`, the one constructor the trainer and the tests use; :func:`tiny_gpt_neox`)."""
from __future__ import annotations

#: The name of the tiny random local model (``conf/model/tiny.yaml``).
TINY_MODEL = "tiny-gpt-neox"


def tiny_gpt_neox(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                  max_position_embeddings: int = 512, seed: int = 42):
    """A pythia-architecture model (GPTNeoXForCausalLM) with random weights, a few MB in size."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=hidden_size * 4,
                           max_position_embeddings=max_position_embeddings, use_parallel_residual=True,
                           tie_word_embeddings=False)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def load_model(name: str, vocab_size: int | None = None, *, max_length: int = 512, dtype=None):
    """The base causal LM ``name`` with embeddings resized to ``vocab_size`` (the tokenizer's
    length) exactly, as Dolly does (pythia's padded 50,304/50,432 rows shrink to 50,280, so
    generation can never emit an id the tokenizer lacks).

    ``tiny-gpt-neox`` (:data:`TINY_MODEL`) builds :func:`tiny_gpt_neox` with ``max_length``
    positions, in fp32 (needs ``vocab_size``); any other name is an ``EleutherAI/pythia-*`` hub
    name or a local checkpoint, loaded from safetensors only (``trust_remote_code=False``) in
    ``dtype`` (a torch dtype; None: transformers' default)."""
    if name == TINY_MODEL:
        if vocab_size is None:
            raise ValueError("tiny-gpt-neox needs the tokenizer's vocab_size")
        return tiny_gpt_neox(vocab_size, max_position_embeddings=max_length)
    from transformers import AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, trust_remote_code=False, **kwargs)
    if vocab_size is not None and model.get_input_embeddings().num_embeddings != vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model
