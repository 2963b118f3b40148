"""Model construction: pythia by name on clusters, a tiny random GPT-NeoX for laptops and tests."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager


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


# ---------------------------------------------------------------------------------------------
# Loading a fine-tuned model for generation (the infer job, benches, notebooks)
#
# A model source is one of:
#   - a local directory (or a FUSE path such as /dbfs/... or /Volumes/...): a Hugging Face model
#     directory as the train job writes it (config.json, *.safetensors, tokenizer files with
#     Dolly's special tokens, generation_config.json);
#   - a pyarrow filesystem URI (s3://, gs://, abfss://, file://) of such a directory: copied once
#     per machine into the local model cache;
#   - an MLflow URI (runs:/<run id>/<path>, models:/<name>/<version or alias>, or any artifact
#     URI mlflow understands): its artifacts downloaded once per machine into the cache; a
#     transformers-flavor layout (model/ and components/tokenizer/) is recognised;
#   - a Hugging Face hub name (org/name), on clusters that can reach the hub: a snapshot of its
#     safetensors, config and tokenizer files.

MODEL_INFO_FILE = "dollyflow_model.json"
_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "dbfs:/databricks/mlflow")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_cache_root() -> str:
    """Where downloaded models are kept: $DOLLYFLOW_MODEL_CACHE, else <tmp>/dollyflow-models
    (local disk on cluster nodes, shared by the Python workers of one machine)."""
    import tempfile
    return os.environ.get("DOLLYFLOW_MODEL_CACHE") or os.path.join(tempfile.gettempdir(), "dollyflow-models")


def source_kind(source: str) -> str:
    """``dir``, ``mlflow``, ``uri`` or ``hub`` for a model source (see above)."""
    s = str(source)
    if not s:
        raise ValueError("empty model source")
    if s.startswith(_MLFLOW_SCHEMES):
        return "mlflow"
    if "://" in s:
        return "uri"
    if os.path.isdir(os.path.expanduser(s)):
        return "dir"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) and not s.startswith("."):
        return "hub"
    raise FileNotFoundError(f"model directory {s!r} does not exist")


@contextmanager
def _file_lock(path: str):
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_download(source: str, fetch) -> str:
    """Run ``fetch(target_dir)`` once per machine for ``source`` (file lock + completion marker,
    so concurrent Python workers of one node download it once) and return the directory."""
    root = model_cache_root()
    key = hashlib.sha256(source.encode("utf-8")).hexdigest()[:24]
    target = os.path.join(root, key)
    done = os.path.join(target, ".dollyflow-complete")
    if os.path.exists(done):
        return target
    with _file_lock(os.path.join(root, f"{key}.lock")):
        if not os.path.exists(done):
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(target)
            fetch(target)
            with open(done, "w") as f:
                f.write(source)
    return target


def _find_model_dir(root: str) -> str:
    """The shallowest directory under ``root`` with a config.json beside weights."""
    candidates = []
    for dirpath, _dirs, files in os.walk(root):
        if "config.json" in files and any(f.endswith((".safetensors", ".bin", ".safetensors.index.json"))
                                          for f in files):
            candidates.append(dirpath)
    if not candidates:
        raise FileNotFoundError(f"no Hugging Face model directory (config.json + weights) under {root}")
    return min(candidates, key=lambda d: (d.count(os.sep), d))


def resolve_model_dir(source: str) -> str:
    """A local directory holding the model of ``source`` (downloading it once per machine when it
    is remote). Local directories are returned as they are."""
    kind = source_kind(source)
    if kind == "dir":
        return os.path.abspath(os.path.expanduser(source))
    if kind == "uri":
        from dollyflow.core.storage import filesystem

        def fetch(target):
            import pyarrow.fs as pafs
            fs, path = filesystem(source)
            pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return _find_model_dir(_cached_download(source, fetch))
    if kind == "mlflow":
        def fetch(target):
            import mlflow.artifacts
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=target)
        return _find_model_dir(_cached_download(source, fetch))
    # hub name: safetensors, configs and tokenizer files only (never pickled .bin weights)

    def fetch(target):
        from huggingface_hub import snapshot_download
        snapshot_download(source, local_dir=target,
                          allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model", "README.md"])
    return _find_model_dir(_cached_download(source, fetch))


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


def weight_signature(model_dir: str) -> dict[str, int]:
    """{safetensors file name: size}: a cheap check that two machines see the same weights."""
    return {n: os.path.getsize(os.path.join(model_dir, n)) for n in weight_files(model_dir)}


_DIGESTS: dict[tuple, str] = {}


def model_digest(model_dir: str) -> str:
    """sha256 over the sorted ``name:sha256`` lines of the model's safetensors files: names the
    weights whatever wrote the directory. Cached per process by path and the files' sizes and
    modification times."""
    from dollyflow.core.tokens import file_sha256

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


def pick_device(device: str = "auto", gpu_addresses: list[str] | None = None) -> str:
    """``cuda:<i>`` when CUDA is available (the first of ``gpu_addresses``, Spark's GPU resource
    of the task, when given), else ``cpu``; an explicit ``cpu``/``cuda``/``cuda:<i>`` is kept."""
    import torch

    if device not in ("auto", "", None):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        return str(device)
    if not torch.cuda.is_available():
        return "cpu"
    if gpu_addresses:
        try:
            index = int(gpu_addresses[0])
        except ValueError:
            index = 0
        if index < torch.cuda.device_count():
            return f"cuda:{index}"
    return "cuda:0" if torch.cuda.device_count() else "cpu"


def pick_dtype(device: str, dtype: str = "auto"):
    """torch dtype: bf16 on GPUs that have it, fp16 on older GPUs (V100), fp32 on CPU; an
    explicit ``float32``/``bfloat16``/``float16`` wins."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in ("auto", "", None):
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}")
        return names[dtype]
    if str(device).startswith("cuda"):
        # bf16 needs Ampere or later (compute capability 8); is_bf16_supported() alone also
        # answers True for emulated bf16 on older GPUs, which is slow
        major, _ = torch.cuda.get_device_capability(torch.device(device).index or 0)
        return torch.bfloat16 if major >= 8 and torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def stop_token_ids(model, tokenizer) -> list[int]:
    """Ids that end a response: the generation config's eos ids (the train job writes the
    ``### End`` id there), ``### End`` itself and the tokenizer's eos."""
    from dollyflow.core.prompt import END_KEY

    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None:
            ids.append(int(value))
    end = tokenizer.convert_tokens_to_ids(END_KEY)
    if end is not None:
        ids.append(int(end))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def check_dolly_tokenizer(tokenizer, model=None) -> None:
    """The tokenizer must carry Dolly's special tokens as single tokens, and the model's
    embedding must have a row for every token id (else every prompt fails at the embedding)."""
    from dollyflow.core.prompt import DOLLY_SPECIAL_TOKENS

    vocab = tokenizer.get_vocab()
    missing = [t for t in DOLLY_SPECIAL_TOKENS if t not in vocab]
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
    import torch
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
    check_dolly_tokenizer(tokenizer, model)
    return model, tokenizer
