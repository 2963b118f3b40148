"""The trained model's directory: fingerprint, provenance, model card, generation config, metrics.

The output directory is a Hugging Face model directory (``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load it and nothing else is needed) plus:

- ``generation_config.json``: ``eos_token_id`` = the ``### End`` id, ``pad_token_id`` = eos, and
  Dolly's sampling settings (top_p 0.92, top_k 0, 256 new tokens);
- ``README.md``: the model card (base model, dataset table and Delta version, shard sha256s,
  config, final metrics, per-category eval loss);
- ``metrics.jsonl``: one JSON object per optimizer step and per evaluation;
- ``dollyflow_model.json``: provenance, written **last**; its presence marks a finished model,
  and its ``fingerprint`` decides whether a rerun is a no-op, a resume or a conflict.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from dollyflow.core.storage import join, read_bytes, write_atomic

PROVENANCE = "dollyflow_model.json"
METRICS = "metrics.jsonl"
CARD = "README.md"
FORMAT = "dollyflow-model"
FORMAT_VERSION = 1

#: train: keys that change the trained weights (and so the fingerprint). Intervals, logging,
#: tracking, paths and the launcher do not.
RESULT_KEYS = ("method", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_train_new_tokens",
               "lora_save", "epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_steps", "warmup_type",
               "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "batch_size", "batch_tokens",
               "grad_accum", "gradient_clipping", "precision", "seed", "group_size", "pad_to_multiple_of",
               "deepspeed", "zero_stage")

#: Dolly's generation settings (training/generate.py)
DOLLY_GENERATION = {"do_sample": True, "top_p": 0.92, "top_k": 0, "max_new_tokens": 256}


def fingerprint(*, model_name: str, manifest_sha256: str, train: dict, processes: int) -> dict:
    """What the trained weights depend on, and its sha256: ``{"sha256", "fields"}``."""
    fields = {"model.name": model_name, "manifest_sha256": manifest_sha256, "processes": int(processes)}
    fields.update({f"train.{k}": train[k] for k in RESULT_KEYS})
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    return {"sha256": digest, "fields": fields}


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for each fingerprint field that differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def read_provenance(output_dir: str) -> dict | None:
    """The finished model's provenance, or None when ``output_dir`` holds no finished model."""
    try:
        data = json.loads(read_bytes(join(output_dir, PROVENANCE)))
    except (FileNotFoundError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def write_provenance(output_dir: str, info: dict) -> dict:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION,
           "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info}
    write_atomic(join(output_dir, PROVENANCE), json.dumps(doc, indent=2, default=str).encode("utf-8"))
    return doc


def generation_config(tokenizer):
    """Dolly's generation settings, stopping at ``### End``; pad = eos."""
    from transformers import GenerationConfig

    from dollyflow.core.prompt import END_KEY

    end_id = tokenizer.convert_tokens_to_ids(END_KEY)
    if end_id is None or end_id == tokenizer.unk_token_id:
        raise ValueError("the tokenizer lacks the '### End' special token")
    return GenerationConfig(eos_token_id=int(end_id), pad_token_id=int(tokenizer.eos_token_id),
                            bos_token_id=tokenizer.bos_token_id, **DOLLY_GENERATION)


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def model_card(p: dict) -> str:
    """A Hugging Face model card (README.md) from the provenance ``p``."""
    m = p.get("metrics", {})
    src = p.get("dataset", {}).get("source", {})
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "license: apache-2.0"]
    base = p.get("base_model", "")
    if base and base != "tiny-gpt-neox":
        lines.append(f"base_model: {base}")
    lines += ["tags:", "  - dollyflow", "  - dolly", "  - gpt-neox", f"  - {p.get('method', 'full')}", "---", ""]
    lines += [f"# {p.get('name', 'dollyflow model')}", "",
              f"`{base}` fine-tuned ({p.get('method')}) to follow instructions in Dolly's prompt format by "
              "dollyflow (DeepSpeed, launched by "
              f"{p.get('launcher')} on {p.get('processes')} process(es)). Prompt:", "",
              "```", "Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.", "", "### Instruction:", "{instruction}", "", "Input:", "{context}", "",
              "### Response:", "```", "",
              "Generation stops at `### End` (`generation_config.json`: eos = `### End`, pad = eos, Dolly's "
              "top_p 0.92, top_k 0, 256 new tokens).", ""]
    lines += ["## Dataset", "", "| | |", "| --- | --- |",
              f"| source table | `{src.get('table', '')}` ({src.get('location', '')}) |",
              f"| Delta version | {src.get('version', '')} |",
              f"| shard directory | `{p.get('dataset', {}).get('shard_dir', '')}` |",
              f"| manifest sha256 | `{p.get('dataset', {}).get('manifest_sha256', '')}` |",
              f"| train records / tokens | {p.get('dataset', {}).get('train_records')} / "
              f"{p.get('dataset', {}).get('train_tokens')} |",
              f"| test records | {p.get('dataset', {}).get('test_records')} |", "",
              "| shard | records | sha256 |", "| --- | --- | --- |"]
    for s in p.get("dataset", {}).get("shards", []):
        lines.append(f"| {s['file']} | {s['records']} | `{s['sha256']}` |")
    lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
    for k in ("steps", "epochs_done", "train_loss", "eval_loss", "train_tokens", "useful_tokens",
              "useful_tokens_per_s", "padding_share", "train_seconds"):
        lines.append(f"| {k} | {_fmt(m.get(k))} |")
    lines += ["", "Eval loss per category (test split):", "", "| category | records | eval loss |",
              "| --- | --- | --- |"]
    for cat, d in sorted((m.get("eval_loss_per_category") or {}).items()):
        lines.append(f"| {cat} | {d.get('records')} | {_fmt(d.get('loss'))} |")
    lines += ["", "## Training config", "", "```json", json.dumps(p.get("config", {}), indent=2, default=str), "```",
              "", f"Run id `{p.get('run_id')}`; MLflow run `{p.get('mlflow_run_id') or '-'}`; fingerprint "
              f"`{p.get('fingerprint', {}).get('sha256', '')}`.", ""]
    return "\n".join(lines)


def write_card(output_dir: str, provenance: dict) -> None:
    write_atomic(join(output_dir, CARD), model_card(provenance).encode("utf-8"))


def read_metrics(path: str) -> list[dict]:
    try:
        text = read_bytes(path).decode("utf-8")
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
