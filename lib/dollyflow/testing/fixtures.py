"""Tiny *trained* Dolly models for tests, benches and the local demo (engine-free).

A random model never emits ``### End``, so stopping, response extraction and early-finishing
rows could not be exercised with one. :func:`tiny_dolly_model` trains a tiny GPT-NeoX (pythia
architecture) for a few hundred plain AdamW steps on a handful of Dolly records until it answers
with a memorised response followed by ``### End``, and saves it with the train job's own writer
(:func:`dollyflow.core.training.model_dir.finish_model_dir`): a Hugging Face model directory
(``config.json``, ``model.safetensors``, the tokenizer with Dolly's special tokens and pad = eos,
``generation_config.json`` whose ``eos_token_id`` is ``### End``, the model card ``README.md``
and the provenance ``dollyflow_model.json``, here with ``kind: fixture``).

Only the transformer blocks are trained; the (random) input and output embeddings stay frozen
and the loss is computed on the response positions only, which keeps a step to milliseconds
even with the real 50k-token vocabulary. (The train job itself needs Spark-made shards and
DeepSpeed; ``tests/jobs/test_infer.py`` runs it end to end into the infer job.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dollyflow.core.models.build import TINY_MODEL, TINY_MODELS, tiny_causal_lm
from dollyflow.core.prompt import prompt_prefix, response_suffix
from dollyflow.core.tokens import IGNORE_INDEX, load_tokenizer
from dollyflow.core.training.model_dir import finish_model_dir


def save_model_dir(model, tokenizer, out_dir: str | Path, info: dict | None = None) -> Path:
    """Save ``model`` (safetensors) and complete the directory as the train job does (tokenizer,
    Dolly's generation config, model card, provenance ``info`` with ``kind: fixture``)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))   # safetensors
    info = {"kind": "fixture", **(info or {})}
    finish_model_dir(str(out), tokenizer, {
        "name": out.name, "base_model": TINY_MODEL, "method": "full", "weights": "full",
        "trained_by": "dollyflow's test fixture (plain AdamW on the transformer blocks, frozen embeddings, "
                      f"{info.get('steps', '?')} steps on {info.get('records', '?')} records)",
        "processes": 1, **info})
    return out


def tiny_dolly_model(out_dir: str | Path, tokenizer_path: str | Path, records: Sequence[dict], steps: int = 200,
                     lr: float = 1e-2, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                     max_position_embeddings: int = 512, seed: int = 42, batch_size: int | None = None,
                     model_type: str = "gpt_neox") -> Path:
    """Train a tiny GPT-NeoX (or another ``model_type`` of :func:`tiny_causal_lm`: llama, qwen2,
    mistral) on ``records`` (dicts with instruction, context, response) until it answers with their
    responses and ``### End``; save it under ``out_dir`` (see module doc).
    ``batch_size``: records per step (shuffled, seeded); None: all of them every step."""
    import torch

    tok = load_tokenizer(str(tokenizer_path))
    model = tiny_causal_lm(model_type, len(tok), hidden_size=hidden_size, layers=layers, heads=heads,
                           kv_heads=heads, max_position_embeddings=max_position_embeddings, seed=seed)
    seqs, labels = [], []
    for r in records:
        p = tok(prompt_prefix(r["instruction"], r.get("context") or ""))["input_ids"]
        s = tok(response_suffix(r["response"]), add_special_tokens=False)["input_ids"]
        seqs.append(p + s)
        labels.append([IGNORE_INDEX] * len(p) + s)
    pad = tok.eos_token_id
    frozen = {id(p) for p in model.get_input_embeddings().parameters()} | \
             {id(p) for p in model.get_output_embeddings().parameters()}
    params = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    body = model.base_model
    head = model.get_output_embeddings()
    rng = torch.Generator().manual_seed(seed)
    size = len(seqs) if not batch_size else min(int(batch_size), len(seqs))
    order: list[int] = []
    for _ in range(int(steps)):
        if len(order) < size:
            order += torch.randperm(len(seqs), generator=rng).tolist() if size < len(seqs) else list(range(len(seqs)))
        pick, order = order[:size], order[size:]
        width = max(len(seqs[i]) for i in pick)
        x = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in pick])
        mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in pick])
        # next-token targets: position t predicts token t + 1
        y = torch.tensor([labels[i][1:] + [IGNORE_INDEX] * (width - len(labels[i]) + 1) for i in pick])
        sel = y != IGNORE_INDEX
        hidden = body(input_ids=x, attention_mask=mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden[sel]), y[sel])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return save_model_dir(model, tok, out_dir, {"kind": "fixture", "steps": int(steps), "records": len(records),
                                                "final_loss": round(float(loss.detach()), 4),
                                                "base_model": next((k for k, v in TINY_MODELS.items()
                                                                    if v == model_type), TINY_MODEL)})


#: A ChatML template (Qwen2's layout) and a Llama-3 one (bos written by the template, header
#: tokens, ``<|eot_id|>``): the test tokenizers' chat templates, with the special tokens they name.
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
#: Mistral's layout: no system turn, ``[INST] ... [/INST]``, the answer ended by eos.
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
CHAT_TEMPLATES = {"chatml": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"]), "mistral": (MISTRAL_TEMPLATE, []),
                  "llama3": (LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                               "<|eot_id|>"])}


def chat_tokenizer(tokenizer_path: str | Path, out_dir: str | Path, style: str = "chatml") -> Path:
    """A copy of the tokenizer at ``tokenizer_path`` made into a chat model's tokenizer, as
    Qwen2's (``chatml``), Llama 3's (``llama3``: its own bos, no pad token) or Mistral's
    (``mistral``: no system turn, eos ends a turn) are: the template's
    special tokens added and ``chat_template`` set. Saved to ``out_dir`` (returned)."""
    template, specials = CHAT_TEMPLATES[style]
    tok = load_tokenizer(str(tokenizer_path), dolly_tokens=False)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    if style == "llama3":
        tok.bos_token = "<|begin_of_text|>"
        tok.pad_token = None
    tok.chat_template = template
    out = Path(out_dir)
    tok.save_pretrained(str(out))
    return out
