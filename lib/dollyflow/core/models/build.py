"""The base causal LM a run starts from: pythia or any decoder-only causal LM transformers loads with
``AutoModelForCausalLM`` (safetensors, no remote code) by hub name or path, or one of the tiny
random models for laptops and tests: ``tiny-gpt-neox`` (pythia's architecture), ``tiny-llama``,
``tiny-qwen2``, ``tiny-mistral`` (:func:`load_model`, the one constructor the trainer and the tests
use; :func:`tiny_gpt_neox`, :func:`tiny_causal_lm`)."""
from __future__ import annotations

#: The name of the tiny random local model (``conf/model/tiny.yaml``).
TINY_MODEL = "tiny-gpt-neox"
#: Every tiny random model: its name -> transformers model type.
TINY_MODELS = {TINY_MODEL: "gpt_neox", "tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-mistral": "mistral"}


def is_tiny(name: str) -> bool:
    """``name`` is one of the tiny random models (built here, not loaded)."""
    return name in TINY_MODELS


def tiny_causal_lm(model_type: str, vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, max_position_embeddings: int = 512, seed: int = 42):
    """A tiny randomly initialised decoder-only model of ``model_type`` (gpt_neox, llama, qwen2,
    mistral) built from its config: grouped-query attention (``kv_heads``) where the architecture
    has it, no bos/eos/pad ids in the config (the tokenizer's and the generation config's rule)."""
    if model_type == "gpt_neox":
        return tiny_gpt_neox(vocab_size, hidden_size, layers, heads, max_position_embeddings, seed)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"sliding_window": None} if model_type in ("mistral", "qwen2") else {}
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=hidden_size,
                                  intermediate_size=hidden_size * 2, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=None, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


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

    A tiny model (:data:`TINY_MODELS`) is built by :func:`tiny_causal_lm` with ``max_length``
    positions, in fp32 (needs ``vocab_size``); any other name is a hub name (pythia, Llama,
    Qwen2, ...) or a local checkpoint, loaded from safetensors only (``trust_remote_code=False``) in
    ``dtype`` (a torch dtype; None: transformers' default)."""
    if is_tiny(name):
        if vocab_size is None:
            raise ValueError(f"{name} needs the tokenizer's vocab_size")
        return tiny_causal_lm(TINY_MODELS[name], vocab_size, max_position_embeddings=max_length)
    from transformers import AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, trust_remote_code=False, **kwargs)
    if vocab_size is not None and model.get_input_embeddings().num_embeddings != vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model
