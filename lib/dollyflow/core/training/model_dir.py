"""The trained model's directory: fingerprint, provenance, model card, generation config, metrics, swap-in.

The output directory is a Hugging Face model directory (``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load it and nothing else is needed) plus:

- ``generation_config.json``: ``eos_token_id`` = the ``### End`` id, ``pad_token_id`` = eos, and
  Dolly's sampling settings (top_p 0.92, top_k 0, 256 new tokens);
- ``README.md``: the model card (base model, dataset table and Delta version, shard sha256s,
  config, final metrics, per-category eval loss);
- ``metrics.jsonl``: one JSON object per optimizer step and per evaluation;
- ``dollyflow_model.json``: provenance, written **last**; its presence marks a finished model,
  its ``fingerprint`` decides whether a rerun is a no-op, a resume or a conflict, and its
  ``files`` lists every file the train job wrote there (relative path and size): what a later
  replacement may remove. Anything else in the directory is a user's and is kept.

:func:`swap_in` puts a replacement model (trained beside the old one) in place of the old one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import hashlib
import json
import os
from datetime import datetime, timezone

from dollyflow.core.models.build import is_tiny
from dollyflow.core.prompt import END_KEY
from dollyflow.core.prompt_format import DOLLY, for_tokenizer, recorded
from dollyflow.core.storage import check_within, join, read_bytes, write_atomic
from dollyflow.core.training import checkpoint

PROVENANCE = "dollyflow_model.json"
METRICS = "metrics.jsonl"
CARD = "README.md"
RUN_FILE = ".dollyflow-train.json"   # written when a run starts in a directory: it is dollyflow's
RUNS_DIR = ".runs"                   # the launchers' per-run status directories
#: What a model directory written before ``files`` was recorded holds of dollyflow's (read only
#: when an old model is replaced): the Hugging Face files our writer produces.
LEGACY_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                CARD, METRICS, "training_config.json", "deepspeed_config.json")
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


def generation_config(tokenizer, prompt: dict | None = None):
    """Dolly's generation settings, stopping at ``### End``; pad = eos. In the chat format
    (``prompt``: the recorded format, :func:`dollyflow.core.prompt_format.recorded`) eos is the
    template's end-of-turn token and the tokenizer's eos, pad the tokenizer's pad."""
    from transformers import GenerationConfig

    rec = recorded({"prompt": prompt} if prompt else None)
    if rec["format"] != DOLLY:
        fmt = for_tokenizer(rec["format"], tokenizer, rec["system"])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return GenerationConfig(eos_token_id=fmt.stop_ids(tokenizer), pad_token_id=pad,
                                bos_token_id=tokenizer.bos_token_id, **DOLLY_GENERATION)
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
    if base and not is_tiny(base):
        lines.append(f"base_model: {base}")
    arch = p.get("architecture") or "gpt-neox"
    lines += ["tags:", "  - dollyflow", "  - dolly", f"  - {arch}", f"  - {p.get('method', 'full')}", "---", ""]
    by = p.get("trained_by") or (f"dollyflow (DeepSpeed, launched by {p.get('launcher')} on "
                                 f"{p.get('processes')} process(es))")
    lines += [f"# {p.get('name', 'dollyflow model')}", "",
              ]
    if recorded(p)["format"] != DOLLY:
        system = recorded(p)["system"]
        lines += [f"`{base}` fine-tuned ({p.get('method')}) to follow instructions in its tokenizer's chat template "
                  f"by {by}: the instruction (and the context under `Input:`) is the user turn, the response the "
                  "assistant turn" + (f", after the system prompt `{system}`" if system else "") + ". Use "
                  "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`; generation stops at the "
                  "template's end-of-turn token or eos (`generation_config.json`).", ""]
    else:
        lines += [f"`{base}` fine-tuned ({p.get('method')}) to follow instructions in Dolly's prompt format by "
                  f"{by}. Prompt:", "",
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


def list_files(directory: str, skip_dirs: tuple[str, ...] = ()) -> dict[str, int]:
    """{relative path: size} of the files below ``directory`` (``skip_dirs``: relative
    directories not descended into)."""
    out: dict[str, int] = {}
    for dirpath, dirs, files in os.walk(directory):
        rel_dir = os.path.relpath(dirpath, directory)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel_dir, d)) not in skip_dirs]
        for f in files:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            out[rel] = os.path.getsize(os.path.join(dirpath, f))
    return out


def finish_model_dir(output_dir: str, tokenizer, provenance: dict, foreign: set[str] | frozenset = frozenset(),
                     skip_dirs: tuple[str, ...] = ("checkpoints", RUNS_DIR)) -> dict:
    """Complete a model directory whose weights (``config.json``, ``*.safetensors``) are written:
    the tokenizer (Dolly's special tokens, pad = eos), ``generation_config.json`` (eos =
    ``### End``), the model card and, last, the provenance that marks it finished (returned),
    listing in ``files`` every file of the directory but ``foreign`` ones (a user's, there
    before the run) and those under ``skip_dirs`` (checkpoints have markers of their own).
    The one writer of these files for the train job and the test/bench fixture
    (:mod:`dollyflow.testing.fixtures`), so that whatever the infer job is tested on has the train
    job's layout."""
    tokenizer.save_pretrained(output_dir)
    generation_config(tokenizer, provenance.get("prompt")).save_pretrained(output_dir)
    write_card(output_dir, provenance)
    files = {k: v for k, v in list_files(output_dir, skip_dirs).items()
             if k not in foreign and k != PROVENANCE and ".tmp-" not in k}
    return write_provenance(output_dir, dict(provenance, files=files))


class ModelIncomplete(RuntimeError):
    """The model directory a train run reports lacks files it should hold."""


#: What a loadable model directory must hold, by the provenance's ``weights``: (description, any of).
REQUIRED_FILES = {
    "full": (("config.json", ("config.json",)), ("safetensors weights", ("*.safetensors",)),
             ("the tokenizer", ("tokenizer.json", "tokenizer_config.json"))),
    "adapter": (("adapter/adapter_config.json", ("adapter/adapter_config.json",)),
                ("adapter weights", ("adapter/*.safetensors",)),
                ("the tokenizer", ("tokenizer.json", "tokenizer_config.json"))),
}


def verify_complete(output_dir: str) -> dict:
    """Check, on this machine, that ``output_dir`` holds the finished model the train run wrote:
    the provenance (``dollyflow_model.json``), every file its ``files`` manifest lists at the size
    recorded there, and what loading needs (``config.json``, safetensors weights, the tokenizer;
    for ``weights: adapter`` the adapter's config and weights). Raises :class:`ModelIncomplete`
    naming the directory and what is missing (e.g. the ranks wrote to another host's disk);
    returns the provenance."""
    prov = read_provenance(output_dir)
    if prov is None:
        raise ModelIncomplete(f"the model directory {output_dir} the train job reports holds no {PROVENANCE} on "
                              "the driver: the ranks wrote it elsewhere (another host's disk?) or did not finish. "
                              "train.output_dir must be a path every rank and the driver see (a mount declared "
                              "in tables.shared_mounts, /Volumes/... on Databricks)")
    present = list_files(output_dir, ("checkpoints", RUNS_DIR))
    problems = []
    listed = prov.get("files")
    if isinstance(listed, dict):
        for rel, size in sorted(listed.items()):
            if rel not in present:
                problems.append(f"{rel} (listed in {PROVENANCE}) is missing")
            elif size is not None and int(present[rel]) != int(size):
                problems.append(f"{rel} has {present[rel]} bytes, {PROVENANCE} recorded {size}")
    else:
        problems.append(f"{PROVENANCE} has no files manifest")
    for what, patterns in REQUIRED_FILES["adapter" if prov.get("weights") == "adapter" else "full"]:
        if not any(fnmatch.fnmatch(rel, pat) for rel in present for pat in patterns):
            problems.append(f"{what} ({' or '.join(patterns)}) is missing")
    if problems:
        raise ModelIncomplete(f"the model directory {output_dir} is incomplete on the driver: "
                              + "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10
                                                            else ""))
    return prov


# ---------------------------------------------------------------------------------------------
# replacing a model: only what the project wrote goes


def project_files(model_dir: str, provenance: dict | None) -> set[str]:
    """The files of ``model_dir`` dollyflow wrote (relative paths): those its provenance lists
    (or, for a model written before that list existed, the standard files and ``adapter/``),
    the provenance and the run file. Checkpoints and status directories are handled apart."""
    listed = (provenance or {}).get("files")
    if isinstance(listed, dict):
        names = set(listed)
    else:
        names = {n for n in LEGACY_FILES if os.path.isfile(os.path.join(model_dir, n))}
        names |= {n for n in os.listdir(model_dir) if n.endswith(".safetensors")} if os.path.isdir(model_dir) else set()
        adapter = os.path.join(model_dir, "adapter")
        if os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            names |= {os.path.join("adapter", n) for n in list_files(adapter)}
    return names | {PROVENANCE, RUN_FILE}


def _exchange(a: str, b: str) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot (then two renames are used)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _prune_empty_dirs(root: str) -> None:
    for dirpath, _dirs, _files in sorted(os.walk(root, topdown=False), key=lambda t: -len(t[0])):
        try:
            if not os.listdir(dirpath):
                os.rmdir(dirpath)
        except OSError:
            pass


def swap_in(new_dir: str, out_dir: str, prev_dir: str) -> dict:
    """Put the finished model in ``new_dir`` in place of the one in ``out_dir``.

    1. the directories are exchanged in one step where the filesystem can (Linux
       ``renameat2``), else by two renames (``out_dir`` -> ``prev_dir``, ``new_dir`` ->
       ``out_dir``: a reader may find no model for that instant, never a mixed one);
    2. whatever in the old directory dollyflow did not write (a user's own files) moves into
       the new one (a name the new model uses too stays in ``prev_dir``);
    3. the old model's files are removed by the list in its provenance, its checkpoints by their
       markers, and ``prev_dir`` itself if nothing else is left in it.

    Returns ``{"carried": [...], "removed": n, "kept": prev_dir or None}``."""
    old_prov = read_provenance(out_dir)
    if os.path.exists(prev_dir):
        raise RuntimeError(f"{prev_dir} exists: a previous replacement of {out_dir} was interrupted; move "
                           "what you want to keep out of it and remove it")
    if os.path.isdir(out_dir):
        if _exchange(new_dir, out_dir):
            os.rename(new_dir, prev_dir)
        else:
            os.rename(out_dir, prev_dir)
            os.rename(new_dir, out_dir)
    else:
        os.rename(new_dir, out_dir)
        return {"carried": [], "removed": 0, "kept": None}
    ours = project_files(prev_dir, old_prov)
    ours_top = {p.split(os.sep, 1)[0] for p in ours}
    carried = []
    for name in sorted(os.listdir(prev_dir)):
        if name in ours_top or name in ("checkpoints", RUNS_DIR):
            continue
        if not os.path.exists(os.path.join(out_dir, name)):
            os.rename(os.path.join(prev_dir, name), os.path.join(out_dir, name))
            carried.append(name)
    removed = 0
    for rel in sorted(ours):
        path = os.path.join(prev_dir, rel)
        try:
            check_within(path, prev_dir, "a file the old model's provenance lists")   # a listed "../x" is refused
            os.remove(path)
            removed += 1
        except (FileNotFoundError, IsADirectoryError):
            pass
    ckpt = os.path.join(prev_dir, "checkpoints")
    if os.path.isdir(ckpt):
        checkpoint.remove_other_runs(ckpt, fingerprint="")
    runs = os.path.join(prev_dir, RUNS_DIR)
    if os.path.isdir(runs) and not any(os.scandir(runs)):
        os.rmdir(runs)
    _prune_empty_dirs(prev_dir)
    kept = prev_dir if os.path.exists(prev_dir) else None
    return {"carried": carried, "removed": removed, "kept": kept}


def read_metrics(path: str) -> list[dict]:
    try:
        text = read_bytes(path).decode("utf-8")
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
