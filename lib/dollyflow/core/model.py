"""Model construction: pythia by name on clusters, a tiny random GPT-NeoX for laptops and tests."""
from __future__ import annotations


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


def load_model(name: str, vocab_size: int | None = None, **kwargs):
    """``EleutherAI/pythia-*`` or a local checkpoint by name; ``tiny-gpt-neox`` builds the tiny
    random model (needs ``vocab_size``, the tokenizer's length)."""
    if name == "tiny-gpt-neox":
        if vocab_size is None:
            raise ValueError("tiny-gpt-neox needs the tokenizer's vocab_size")
        return tiny_gpt_neox(vocab_size, **kwargs)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model
