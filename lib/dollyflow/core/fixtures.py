"""Tiny *trained* Dolly models for tests, benches and the local demo (engine-free).

A random model never emits ``### End``, so stopping, response extraction and early-finishing
rows could not be exercised with one. :func:`tiny_dolly_model` trains a tiny GPT-NeoX (pythia
architecture) for a few hundred plain AdamW steps on a handful of Dolly records until it answers
with a memorised response followed by ``### End``, and saves it as the train job does: a Hugging
Face model directory (``config.json``, ``model.safetensors``, the tokenizer with Dolly's special
tokens and pad = eos, ``generation_config.json`` whose ``eos_token_id`` is ``[### End, eos]``,
``README.md`` and ``dollyflow_model.json``).

Only the transformer blocks are trained; the (random) input and output embeddings stay frozen
and the loss is computed on the response positions only, which keeps a step to milliseconds
even with the real 50k-token vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from dollyflow.core.prompt import END_KEY, prompt_prefix, response_suffix


def save_model_dir(model, tokenizer, out_dir: str | Path, info: dict | None = None) -> Path:
    """Save ``model`` and ``tokenizer`` as a Hugging Face directory with Dolly's generation
    config (eos = ``[### End, eos]``, pad = eos), a model card and ``dollyflow_model.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    end_id = tokenizer.convert_tokens_to_ids(END_KEY)
    model.generation_config.eos_token_id = [end_id, tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out))   # safetensors
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text("# tiny Dolly model\n\nA tiny GPT-NeoX fine-tuned on a few Dolly records "
                                   "(dollyflow test fixture).\n", encoding="utf-8")
    (out / "dollyflow_model.json").write_text(json.dumps(info or {"kind": "fixture"}, indent=2), encoding="utf-8")
    return out


def tiny_dolly_model(out_dir: str | Path, tokenizer_path: str | Path, records: Sequence[dict], steps: int = 200,
                     lr: float = 1e-2, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                     max_position_embeddings: int = 512, seed: int = 42) -> Path:
    """Train a tiny GPT-NeoX on ``records`` (dicts with instruction, context, response) until it
    answers with their responses and ``### End``; save it under ``out_dir`` (see module doc)."""
    import torch

    from dollyflow.core.model import tiny_gpt_neox
    from dollyflow.core.tokens import IGNORE_INDEX, load_tokenizer

    tok = load_tokenizer(str(tokenizer_path))
    model = tiny_gpt_neox(len(tok), hidden_size=hidden_size, layers=layers, heads=heads,
                          max_position_embeddings=max_position_embeddings, seed=seed)
    seqs, labels = [], []
    for r in records:
        p = tok(prompt_prefix(r["instruction"], r.get("context") or ""))["input_ids"]
        s = tok(response_suffix(r["response"]), add_special_tokens=False)["input_ids"]
        seqs.append(p + s)
        labels.append([IGNORE_INDEX] * len(p) + s)
    width = max(map(len, seqs))
    pad = tok.eos_token_id
    x = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    # next-token targets: position t predicts token t + 1
    y = torch.tensor([lab[1:] + [IGNORE_INDEX] * (width - len(lab) + 1) for lab in labels])
    sel = y != IGNORE_INDEX
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
    for _ in range(int(steps)):
        hidden = body(input_ids=x, attention_mask=mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden[sel]), y[sel])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return save_model_dir(model, tok, out_dir, {"kind": "fixture", "steps": int(steps), "records": len(records),
                                                "final_loss": round(float(loss.detach()), 4)})
