"""A model directory's files: its safetensors weights (:func:`weight_files`, pickled weights
refused), their digest (:func:`model_digest`, the predictions' ``model_sha``), the train job's
provenance file (:func:`model_info`) and where its tokenizer files are (:func:`tokenizer_dir_for`)."""
from __future__ import annotations

import hashlib
import json
import os

from dollyflow.core.tokens import file_sha256

MODEL_INFO_FILE = "dollyflow_model.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_dir_for(model_dir: str) -> str:
    """The model directory itself when it holds the tokenizer files, else the MLflow
    transformers-flavor location (``../components/tokenizer``)."""
    if any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
        return model_dir
    flavor = os.path.join(os.path.dirname(model_dir.rstrip(os.sep)), "components", "tokenizer")
    if os.path.isdir(flavor):
        return flavor
    raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {model_dir}")


def weight_files(model_dir: str) -> list[str]:
    """The model's safetensors files (sorted names). Pickled weights are refused: loading them
    can run arbitrary code."""
    names = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not names:
        pickled = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = f" (found pickled weights {pickled}: convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}{hint}; only safetensors are loaded")
    return names


_DIGESTS: dict[tuple, str] = {}


def model_digest(model_dir: str) -> str:
    """sha256 over the sorted ``name:sha256`` lines of the model's safetensors files: names the
    weights whatever wrote the directory. Cached per process by path and the files' sizes and
    modification times."""
    model_dir = os.path.abspath(model_dir)
    names = weight_files(model_dir)
    stats = tuple((n, os.stat(os.path.join(model_dir, n)).st_size, os.stat(os.path.join(model_dir, n)).st_mtime_ns)
                  for n in names)
    key = (model_dir, stats)
    if key not in _DIGESTS:
        lines = "".join(f"{n}:{file_sha256(os.path.join(model_dir, n))}\n" for n in names)
        _DIGESTS[key] = hashlib.sha256(lines.encode("utf-8")).hexdigest()
    return _DIGESTS[key]


def model_info(model_dir: str) -> dict | None:
    """The train job's provenance file (``dollyflow_model.json``) when present, else None."""
    path = os.path.join(model_dir, MODEL_INFO_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
