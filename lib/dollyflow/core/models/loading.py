"""Loading a fine-tuned model for generation (the infer job, benches, notebooks):
:func:`load_for_generation` from a local model directory (safetensors only, no remote code), and
the checks that model and tokenizer are Dolly's (:func:`check_dolly_tokenizer`,
:func:`stop_token_ids`)."""
from __future__ import annotations

import json
import os

from dollyflow.core.models.device import pick_dtype
from dollyflow.core.models.files import tokenizer_dir_for, weight_files
from dollyflow.core.prompt import DOLLY_SPECIAL_TOKENS, END_KEY
from dollyflow.core.prompt_format import format_from_info

#: The train job's provenance file in a model directory (dollyflow.core.training.model_dir.PROVENANCE).
PROVENANCE = "dollyflow_model.json"


def stop_token_ids(model, tokenizer, end_key: bool = True) -> list[int]:
    """Ids that end a response: the generation config's eos ids (the train job writes the
    ``### End`` id there, or a chat template's end-of-turn id), ``### End`` itself (unless
    ``end_key=False``) and the tokenizer's eos."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None:
            ids.append(int(value))
    end = tokenizer.get_vocab().get(END_KEY) if end_key else None
    if end is not None:
        ids.append(int(end))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def check_dolly_tokenizer(tokenizer, model=None, dolly: bool = True) -> None:
    """The tokenizer must carry Dolly's special tokens as single tokens (unless ``dolly=False``:
    a chat-template model), and the model's embedding must have a row for every token id (else
    every prompt fails at the embedding)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in DOLLY_SPECIAL_TOKENS if t not in vocab] if dolly else []
    if missing:
        raise ValueError(f"the tokenizer lacks Dolly's special tokens {missing}: generation needs a model "
                         "fine-tuned with them (a dollyflow train output or a databricks/dolly-v2 model)")
    if model is not None:
        rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                             f"{rows} rows: tokenizer and weights do not belong together")


def load_for_generation(model_dir: str, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) for generation from a local model directory: safetensors only,
    ``trust_remote_code=False``, the dtype of :func:`pick_dtype`, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weight_files(model_dir)   # refuses pickled-only directories before transformers sees them
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir_for(model_dir), trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token   # Dolly pads with eos
    torch_dtype = pick_dtype(device, dtype)
    kwargs = {"dtype": torch_dtype, "use_safetensors": True, "trust_remote_code": False}
    if str(device).startswith("cuda"):
        kwargs["device_map"] = {"": device}   # straight onto the GPU, no full CPU copy
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not str(device).startswith("cuda"):
        model.to(device)
    model.eval()
    fmt = prompt_format_of(model_dir, tokenizer)
    check_dolly_tokenizer(tokenizer, model, dolly=fmt.name == "dolly")
    return model, tokenizer


def prompt_format_of(model_dir: str, tokenizer):
    """The prompt format a model directory was trained with (its ``dollyflow_model.json``'s
    ``prompt``; see :func:`dollyflow.core.prompt_format.format_from_info` for a directory without one)."""
    info = None
    try:
        with open(os.path.join(str(model_dir), PROVENANCE), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = None
    return format_from_info(info if isinstance(info, dict) else None, tokenizer, where=f"the model {model_dir}")
