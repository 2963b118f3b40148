"""The model the loop trains: base model by name, LoRA, the loss module and the saved directory.

- :func:`build_model`: ``tiny-gpt-neox`` (the random local preset) or a pythia checkpoint by hub
  name or path (safetensors only, ``trust_remote_code=False``; under ZeRO-3 the weights are loaded
  already partitioned), embeddings resized to the shard tokenizer's length exactly, as Dolly does
  (pythia's padded 50,304/50,432 rows shrink to 50,280, so generation can never emit an id the
  tokenizer lacks).
- :func:`apply_lora`: peft LoRA on GPT-NeoX's ``query_key_value`` and dense layers (other
  architectures: peft's targets for them, or ``all-linear``, :func:`lora_targets`); the rows of
  Dolly's three added tokens in the input embedding and the output head are trained too (peft
  ``trainable_token_indices``), since they start untrained and ``### End`` must be learned.
- :class:`LabelLoss`: the module DeepSpeed wraps. Its forward runs the transformer body on the
  whole padded batch but the vocabulary projection only at the positions that carry a label (the
  response and ``### End``); prompt and padding positions never reach the 50k-wide head. It returns
  per-row loss sums and label counts, so the loop can normalise by the global label count and
  evaluation can sum per category.
- :func:`save_model`: the Hugging Face directory from a full (rank-0) state dict: merged weights,
  and/or the LoRA adapter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dollyflow.core.models.build import load_model
from dollyflow.core.tokens import IGNORE_INDEX

#: Model types whose causal-LM forward is ``head(body(ids).last_hidden_state)``: for them the head
#: is applied to label positions only. Others run their own forward (same loss, more compute).
HEAD_ON_LABELS_ONLY = {"gpt_neox", "llama", "qwen2", "qwen3", "mistral", "olmo2"}

#: train.lora_target_modules' default: GPT-NeoX's attention and MLP projections (Dolly's model).
GPT_NEOX_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(name: str, vocab_size: int, *, max_length: int, precision: str = "fp32",
                gradient_checkpointing: bool = False):
    """The base causal LM, embeddings resized to ``vocab_size`` (the shard tokenizer's length).
    Under ZeRO-3 call it after creating ``transformers.integrations.HfDeepSpeedConfig`` so the
    checkpoint loads partitioned."""
    model = load_model(name, vocab_size, max_length=max_length, dtype=TORCH_DTYPES[precision])
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError("module not found in the model")


def lora_targets(targets, model=None):
    """peft's ``target_modules`` for ``train.lora_target_modules``: ``[auto]`` (and the GPT-NeoX
    default on any other architecture) is None, peft's own targets for the architecture (Llama,
    Qwen2, Mistral, OLMo2: q_proj and v_proj); ``[all-linear]`` every linear layer but the output
    head; otherwise the module names, each of which must exist in the model (ValueError naming the
    key)."""
    targets = list(targets)
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None) if model is not None else None
    if targets == ["auto"]:
        return list(GPT_NEOX_TARGETS) if model_type == "gpt_neox" or model is None else None
    if targets == GPT_NEOX_TARGETS and model_type not in (None, "gpt_neox"):
        return None
    if targets == ["all-linear"]:
        return "all-linear"
    if model is not None:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [x for x in targets if x not in names]
        if missing:
            raise ValueError(f"train.lora_target_modules: {missing} name no module of this {model_type} model; use "
                             "[auto] (peft's targets for the architecture), [all-linear] or names such as "
                             f"{sorted(n for n in names if 'proj' in n)[:6]}")
    return targets


def lora_config(t, model=None, new_token_ids=()):
    """The peft ``LoraConfig`` for the train settings ``t`` (the ``train:`` section)."""
    from peft import LoraConfig

    kw = dict(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
              target_modules=lora_targets(t.lora_target_modules, model), bias="none", task_type="CAUSAL_LM")
    if t.lora_train_new_tokens and new_token_ids and model is not None:
        ids = sorted(int(i) for i in new_token_ids)
        kw["trainable_token_indices"] = {_module_name(model, model.get_input_embeddings()): ids,
                                         _module_name(model, model.get_output_embeddings()): ids}
    return LoraConfig(**kw)


def apply_lora(model, t, new_token_ids=()):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(t, model, new_token_ids))


def unwrap(model):
    """The Hugging Face causal LM inside a peft wrapper (LoRA layers stay injected in it)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


class LabelLoss(nn.Module):
    """Causal-LM cross entropy over label positions, per row: ``(row_loss_sum, row_label_count)``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels):
        core = unwrap(self.lm)
        targets = labels[:, 1:]
        sel = targets != IGNORE_INDEX
        if core.config.model_type in HEAD_ON_LABELS_ONLY:
            hidden = core.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state
            logits = core.get_output_embeddings()(hidden[:, :-1][sel])
        else:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][sel]
        tok = F.cross_entropy(logits.float(), targets[sel], reduction="none")
        rows = sel.nonzero(as_tuple=True)[0]
        row_sum = torch.zeros(input_ids.shape[0], dtype=tok.dtype, device=tok.device).index_add_(0, rows, tok)
        return row_sum, sel.sum(dim=1)


def strip_prefix(state_dict: dict, prefix: str = "lm.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def save_model(out_dir: str, state_dict: dict, lm, *, method: str, lora_save: str = "both",
               dtype: torch.dtype | None = None) -> dict:
    """Write the model files of ``out_dir`` from a full state dict of ``lm`` (the trained model,
    possibly a peft model; its own parameters may be ZeRO-3 placeholders). Returns
    ``{"weights": "merged"|"adapter"|"full", "adapter_dir": ...}``."""
    import os

    core = unwrap(lm)
    if method == "full":
        core.config.use_cache = True
        core.save_pretrained(out_dir, state_dict=_cast(state_dict, dtype))
        return {"weights": "full", "adapter_dir": None}
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    out = {"weights": None, "adapter_dir": None}
    adapter_dir = out_dir if lora_save == "adapter" else os.path.join(out_dir, "adapter")
    lm.save_pretrained(adapter_dir, state_dict=state_dict)
    out["adapter_dir"] = adapter_dir
    if lora_save == "adapter":
        out["weights"] = "adapter"
        return out
    # merged weights: a CPU copy of the model (no memory beyond the state dict: meta + assign)
    config = core.config.__class__.from_dict(core.config.to_dict())
    config.use_cache = True
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    peft_cfg = next(iter(lm.peft_config.values()))
    copy = get_peft_model(base, peft_cfg)
    missing, unexpected = copy.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"LoRA merge: state dict does not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    merged = copy.merge_and_unload()
    merged.save_pretrained(out_dir, state_dict=_cast(merged.state_dict(), dtype))
    out["weights"] = "merged"
    return out


def _cast(state_dict: dict, dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return state_dict
    return {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in state_dict.items()}
