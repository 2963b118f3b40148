"""The untrained base model a fine-tune started from, as a model directory the infer job scores:
the other side of ``dollyflow pipeline``'s comparison (``evaluate.baseline=base``).

The train job builds its starting point with :func:`dollyflow.core.training.modeling.build_model`
(:func:`dollyflow.core.models.build.load_model`: ``tiny-gpt-neox`` is the pythia-architecture
model with its fixed seed, any other name a pythia checkpoint by hub name or path) with the
embeddings resized to the shards' tokenizer. :func:`write_base_model` builds exactly that model
(fp32, ``max_length`` positions) and saves it beside the fine-tune (:func:`base_dir_for`) as a
Hugging Face directory with the shards' tokenizer (Dolly's special tokens), Dolly's
``generation_config.json`` (eos = ``### End``) and ``dollyflow_model.json`` with ``kind: base``,
written last. The provenance names the shards' tokenized table and version, so infer scores the
same test split as the fine-tune's, and ``trained: false``.

The directory is keyed by the base model's name, the tokenizer's sha256 and ``max_length``; one
that already holds a finished base of the same key is used as it is, so a rerun scores the same
weights (same ``model_sha``) and writes nothing new.
"""
from __future__ import annotations

import hashlib
import json
import os

from dollyflow.core.models.build import load_model
from dollyflow.core.shards import TOKENIZER_DIR, manifest_sha256, read_manifest
from dollyflow.core.storage import join
from dollyflow.core.prompt_format import load_prompt_tokenizer, recorded
from dollyflow.core.training.data import local_dir
from dollyflow.core.training.model_dir import generation_config, read_provenance, write_provenance
from dollyflow.core.training.prepare import model_short_name

KIND = "base"


def base_key(model_name: str, manifest: dict, max_length: int) -> str:
    """What the base directory's weights and tokenizer depend on, as 16 hex digits."""
    tok = manifest.get("tokenizer") or {}
    doc = {"model": model_name, "tokenizer_sha256": tok.get("sha256"), "max_length": int(max_length)}
    if recorded(manifest)["format"] != "dolly":
        doc["prompt"] = recorded(manifest)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def base_dir_for(output_dir: str, model_name: str, manifest: dict, max_length: int) -> str:
    """The base model's directory: beside the fine-tune's ``output_dir``,
    ``<model>-base-<key sha8>``."""
    parent = os.path.dirname(os.path.normpath(output_dir))
    return os.path.join(parent, f"{model_short_name(model_name)}-base-{base_key(model_name, manifest, max_length)[:8]}")


def write_base_model(model_name: str, shard_dir: str, out_dir: str, max_length: int) -> dict:
    """Build the base model the train job starts from for the shards ``shard_dir`` and save it to
    ``out_dir`` (see the module doc); returns its provenance. A directory that already holds a
    finished base of the same key is left as it is (``reused: true`` in the returned dict).
    Raises whatever loading the base raises (a hub name without network, a missing path)."""
    manifest = read_manifest(shard_dir)
    key = base_key(model_name, manifest, max_length)
    prov = read_provenance(out_dir)
    if prov is not None:
        if prov.get("kind") == KIND and prov.get("key") == key:
            return dict(prov, reused=True)
        raise RuntimeError(f"{out_dir} holds another model ({prov.get('kind') or 'a trained one'}, key "
                           f"{prov.get('key')}): not overwriting it")
    tok, _fmt = load_prompt_tokenizer(local_dir(join(shard_dir, TOKENIZER_DIR)), manifest)
    model = load_model(model_name, len(tok), max_length=max_length)
    model.config.use_cache = True
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)      # safetensors
    tok.save_pretrained(out_dir)
    generation_config(tok, recorded(manifest)).save_pretrained(out_dir)
    doc = write_provenance(out_dir, {
        "kind": KIND, "key": key, "trained": False, "name": os.path.basename(os.path.normpath(out_dir)),
        "base_model": model_name, "method": "none", "weights": "base", "prompt": recorded(manifest),
        "about": "the untrained model the fine-tune started from (the train job's starting point for these "
                 "shards: same weights, embeddings resized to the shards' tokenizer); trained on nothing",
        "dataset": {"shard_dir": shard_dir, "manifest_sha256": manifest_sha256(shard_dir),
                    "tokenized_table": manifest.get("tokenized_table"), "source": manifest.get("source", {})},
        "max_length": int(max_length)})
    return dict(doc, reused=False)
