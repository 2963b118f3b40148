"""Model construction: pythia by name on clusters, a tiny random GPT-NeoX for laptops and tests."""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass


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
# A model source is one of four kinds (source_kind):
#   - dir: a local directory (or a FUSE path such as /dbfs/... or /Volumes/...): a Hugging Face
#     model directory as the train job writes it (config.json, *.safetensors, tokenizer files
#     with Dolly's special tokens, generation_config.json). Used where it is.
#   - uri: a pyarrow filesystem URI (s3://, gs://, abfss://, hdfs://, file://) of such a
#     directory, copied once per machine into the model cache.
#   - mlflow: an MLflow URI (runs:/<run id>/<path>, models:/<name>/<version | alias | stage |
#     latest>, models:/<name>@<alias>, models:/<logged model id>, mlflow-artifacts:/...,
#     dbfs:/databricks/mlflow...): its artifacts downloaded once per machine into the cache; a
#     transformers-flavor layout (model/ and components/tokenizer/) is recognised.
#   - hub: a Hugging Face hub name, on clusters that can reach the hub: org/name or
#     org/name@<revision>; a snapshot of its safetensors, config and tokenizer files.
#
# Which text is a hub name and which a path (so that a mistyped or missing local directory is an
# error, not a download of whatever the hub has under that name): anything that exists locally
# is a path; a hub name is exactly ``org/name`` or ``org/name@revision`` (letters, digits, ``_``,
# ``.``, ``-``; one ``/``) that does not start with ``.``, ``/`` or ``~`` and whose first segment
# is not an existing local file or directory (``out/dolly-lora`` with an ``out/`` here is a
# missing path). Everything else that does not exist is a missing path and fails, naming it.
#
# The cache is keyed by an immutable identity of what was resolved, never by the source text,
# so a moving source (an alias, ``latest``, a stage, a rewritten directory, a hub branch) is
# fetched again when it moves: an MLflow registry source is resolved to its model version (name
# and number, with its run id and source) and that version is downloaded; ``runs:/`` and other
# run artifact URIs are keyed by the run; a ``uri`` directory by a fingerprint of its listing
# (each file's path, size and modification time; pyarrow exposes no ETag or object version);
# a hub name by the commit sha the revision points at (``HfApi().model_info``), which is then
# what is downloaded. The cache is a private directory (see :func:`model_cache_root`).

MODEL_INFO_FILE = "dollyflow_model.json"
_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "dbfs:/databricks/mlflow")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_HUB_NAME = re.compile(r"(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9_][\w.-]*)(?:@(?P<revision>[\w.-]+))?")
_HUB_FILES = ["*.safetensors", "*.json", "*.txt", "*.model", "README.md"]   # never pickled .bin weights
CACHE_ENV = "DOLLYFLOW_MODEL_CACHE"
COMPLETE_MARKER = ".dollyflow-complete"      # written last into a cache entry: the download is whole


def private_dir(path: str, what: str) -> str:
    """``path`` as a directory only this user can write: created with mode 0700 when missing
    (its parents as usual); an existing one must be a real directory (not a symbolic link),
    owned by this user and writable by nobody else, else a PermissionError saying what to do.
    A cache in a shared place (``/tmp``) must not be one another user prepared: its models would
    be loaded, and its pickles and configs trusted, by this user's jobs."""
    import stat

    path = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise PermissionError(f"{what} {path} is a symbolic link: refusing to use it (point it at the directory "
                              f"itself, or set ${CACHE_ENV} to a directory of yours)")
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{what} {path} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
                              f"refusing to load models from it. Remove it, or set ${CACHE_ENV} to a directory "
                              "of yours")
    if st.st_mode & 0o022:
        raise PermissionError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                              f"refusing to load models from it. chmod 700 it, or set ${CACHE_ENV} to a "
                              "private directory")
    return path


def model_cache_root() -> str:
    """Where downloaded models are kept, checked by :func:`private_dir`: ``$DOLLYFLOW_MODEL_CACHE``
    when set, else ``<tmp>/dollyflow-models-<uid>`` (local disk on cluster nodes, shared by the
    Python workers of one user on one machine, created 0700)."""
    import tempfile

    env = os.environ.get(CACHE_ENV)
    if env:
        return private_dir(env, f"${CACHE_ENV}")
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return private_dir(os.path.join(tempfile.gettempdir(), f"dollyflow-models-{uid}"), "the model cache")


def _hub_name(s: str):
    """The match of a hub name (see above), or None when ``s`` is to be read as a path."""
    m = _HUB_NAME.fullmatch(s)
    if m is None or s.startswith((".", "/", "~")) or os.path.lexists(os.path.expanduser(m["org"])):
        return None
    return m


def source_kind(source: str) -> str:
    """``dir``, ``mlflow``, ``uri`` or ``hub`` for a model source (see above). A path that does
    not exist (and is no hub name) is a FileNotFoundError naming it."""
    s = str(source)
    if not s:
        raise ValueError("empty model source")
    if s.startswith(_MLFLOW_SCHEMES):
        return "mlflow"
    if "://" in s:
        return "uri"
    path = os.path.expanduser(s)
    if os.path.isdir(path):
        return "dir"
    if os.path.lexists(path):
        raise NotADirectoryError(f"model source {os.path.abspath(path)} is not a directory (a model is a directory "
                                 "with config.json and *.safetensors)")
    if _hub_name(s):
        return "hub"
    raise FileNotFoundError(f"model directory {os.path.abspath(path)} does not exist (model source {s!r}); a "
                            "Hugging Face hub name is org/name or org/name@revision whose first segment is not "
                            "a local path")


@dataclass(frozen=True)
class ModelSource:
    """A model source resolved to an immutable identity (small and picklable: it travels to the
    Spark workers, which fetch exactly ``pinned`` and check it is still ``identity``).

    ``source`` is as configured and may hold credentials (``s3://KEY:SECRET@...``): print
    :attr:`display`, never ``source``."""
    kind: str                  # dir | uri | mlflow | hub
    source: str                # as configured
    pinned: str                # what is fetched: the directory, the URI, models:/<name>/<version>, org/name@<sha>
    identity: str              # the immutable identity (credential-free): listing sha256, model version, commit sha
    key: str = ""              # the cache key (sha256 hex of kind and identity); "" for a dir

    @property
    def display(self) -> str:
        from dollyflow.config import redact_uri
        return redact_uri(self.source)

    def describe(self) -> dict:
        """What the job summary says about the source (no credentials)."""
        from dollyflow.config import redact_uri
        return {"kind": self.kind, "source": self.display, "resolved": redact_uri(self.pinned),
                "identity": self.identity}


def _cache_key(kind: str, identity: str) -> str:
    return hashlib.sha256(f"{kind}\n{identity}".encode("utf-8")).hexdigest()[:32]


def _listing(source: str) -> tuple[object, str, list[tuple[str, int, int]]]:
    """(filesystem, root, [(relative path, size, mtime ns)]) of every file under a URI directory."""
    import pyarrow.fs as pafs

    from dollyflow.config import redact_uri
    from dollyflow.core.storage import filesystem

    fs, root = filesystem(source)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        raise FileNotFoundError(f"model directory {redact_uri(source)} does not exist") from None
    files = sorted((i.path[len(root):].lstrip("/"), int(i.size), int(i.mtime_ns or 0))
                   for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"model directory {redact_uri(source)} holds no files")
    return fs, root, files


def _listing_identity(files: list[tuple[str, int, int]]) -> str:
    text = "".join(f"{p}\t{size}\t{mtime}\n" for p, size, mtime in files)
    return f"listing-sha256:{hashlib.sha256(text.encode('utf-8')).hexdigest()}"


def _mlflow_source(source: str) -> ModelSource:
    """An MLflow source pinned: a registry URI (alias, stage, ``latest``) to its model version."""
    from dollyflow.config import redact_uri

    if not source.startswith("models:/"):
        # runs:/<run id>/..., mlflow-artifacts:/..., dbfs:/databricks/mlflow...: a run's artifacts
        import mlflow

        identity = f"{redact_uri(mlflow.get_tracking_uri())} {redact_uri(source)}"
        return ModelSource("mlflow", source, source, identity, _cache_key("mlflow", identity))
    import mlflow
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    resolved = get_model_name_and_version(client, source)   # MLflow's own resolution of alias/stage/latest
    registry = redact_uri(mlflow.get_registry_uri())
    if len(resolved) == 1:                                   # models:/<logged model id>: immutable
        identity = f"{registry} models:/{resolved[0]}"
        return ModelSource("mlflow", source, source, identity, _cache_key("mlflow", identity))
    name, version = resolved
    mv = client.get_model_version(name, str(version))
    pinned = f"models:/{name}/{mv.version}"
    identity = f"{registry} {pinned} run {mv.run_id} source {redact_uri(str(mv.source))}"
    return ModelSource("mlflow", source, pinned, identity, _cache_key("mlflow", identity))


def _hub_source(source: str) -> ModelSource:
    m = _hub_name(source)
    name, revision = f"{m['org']}/{m['name']}", m["revision"]
    try:
        from huggingface_hub import HfApi
        sha = HfApi().model_info(name, revision=revision).sha
    except Exception as e:
        raise RuntimeError(f"model source {source!r} was read as a Hugging Face hub name, and the hub could not "
                           f"resolve it ({type(e).__name__}: {e}). If you meant a local directory: "
                           f"{os.path.abspath(os.path.expanduser(source))} does not exist") from None
    if not sha:
        raise RuntimeError(f"the hub gave no commit sha for {source!r}")
    pinned = f"{name}@{sha}"
    return ModelSource("hub", source, pinned, pinned, _cache_key("hub", pinned))


def locate_model(source: str) -> ModelSource:
    """Resolve ``source`` (see above) to a :class:`ModelSource` with its immutable identity;
    downloads nothing (lists a ``uri`` directory, asks the MLflow registry or the hub)."""
    kind = source_kind(source)
    if kind == "dir":
        d = os.path.abspath(os.path.expanduser(source))
        return ModelSource("dir", d, d, d)       # stored and shown as the absolute path
    if kind == "uri":
        from dollyflow.config import redact_uri
        _, _, files = _listing(source)
        identity = f"{redact_uri(source)} {_listing_identity(files)}"
        return ModelSource("uri", source, source, identity, _cache_key("uri", identity))
    if kind == "mlflow":
        return _mlflow_source(source)
    return _hub_source(source)


@contextmanager
def _file_lock(path: str):
    import fcntl
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_download(ms: ModelSource, fetch) -> str:
    """Run ``fetch(target_dir)`` once per machine for ``ms.key`` (file lock + completion marker,
    so concurrent Python workers of one node download it once) and return the directory."""
    root = model_cache_root()
    target = os.path.join(root, ms.key)
    done = os.path.join(target, COMPLETE_MARKER)
    if os.path.exists(done):
        return target
    with _file_lock(os.path.join(root, f"{ms.key}.lock")):
        if not os.path.exists(done):
            from dollyflow.core.storage import remove_dir
            remove_dir(target, under=root)      # a half-finished download of this key
            os.makedirs(target)
            fetch(target)
            with open(done, "w") as f:
                f.write(f"{ms.kind} {ms.identity}\n")
    return target


def _fetch_uri(ms: ModelSource, target: str) -> None:
    """Copy exactly the listed files, checking the listing is still the one ``ms`` was resolved
    with, before and after (a directory rewritten meanwhile is an error, never a mixed copy)."""
    import pyarrow.fs as pafs

    fs, root, files = _listing(ms.source)
    prefix = f"{ms.display} "
    if f"{prefix}{_listing_identity(files)}" != ms.identity:
        raise RuntimeError(f"model directory {ms.display} changed since it was resolved ({ms.identity}): "
                           "was it rewritten during the job? Run again")
    local = pafs.LocalFileSystem()
    for rel, _, _ in files:
        dst = os.path.join(target, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        pafs.copy_files(f"{root}/{rel}", dst, source_filesystem=fs, destination_filesystem=local)
    _, _, after = _listing(ms.source)
    if after != files:
        raise RuntimeError(f"model directory {ms.display} changed while it was copied: run again")


def cache_entry(ms: ModelSource) -> str:
    """The cache directory ``ms`` is (or would be) fetched into on this machine; "" for a dir."""
    return "" if ms.kind == "dir" else os.path.join(model_cache_root(), ms.key)


def fetched_copy(ms: ModelSource, entry: str, model_dir: str) -> str | None:
    """``model_dir`` when it lies in ``entry``, a cache entry another process (the driver)
    fetched ``ms`` into, that is complete and in a private cache of this user (checked as
    :func:`model_cache_root` checks its own), else None: a worker on the driver's machine then
    uses the driver's copy instead of fetching again."""
    if ms.kind == "dir" or not entry or os.path.basename(entry) != ms.key:
        return None
    if not os.path.isfile(os.path.join(entry, COMPLETE_MARKER)):
        return None
    if not os.path.abspath(model_dir).startswith(os.path.abspath(entry) + os.sep) and \
            os.path.abspath(model_dir) != os.path.abspath(entry):
        return None
    private_dir(os.path.dirname(entry), "the driver's model cache")
    return model_dir


def fetch_model(ms: ModelSource) -> str:
    """The local model directory of a :class:`ModelSource` (a ``dir`` as it is; anything else
    downloaded once per machine into the cache under its immutable identity)."""
    if ms.kind == "dir":
        if not os.path.isdir(ms.pinned):
            raise FileNotFoundError(f"model directory {ms.pinned} does not exist on this machine "
                                    "(on a cluster, use shared storage: /Volumes, /dbfs or an object-store URI)")
        return ms.pinned
    if ms.kind == "uri":
        return _find_model_dir(_cached_download(ms, lambda target: _fetch_uri(ms, target)))
    if ms.kind == "mlflow":
        def fetch(target):
            import mlflow.artifacts
            mlflow.artifacts.download_artifacts(artifact_uri=ms.pinned, dst_path=target)
        return _find_model_dir(_cached_download(ms, fetch))
    if ms.kind == "hub":
        def fetch(target):
            from huggingface_hub import snapshot_download
            name, sha = ms.pinned.split("@", 1)
            snapshot_download(name, revision=sha, local_dir=target, allow_patterns=_HUB_FILES)
        return _find_model_dir(_cached_download(ms, fetch))
    raise ValueError(f"unknown model source kind {ms.kind!r}")


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
    """A local directory holding the model of ``source`` (:func:`locate_model`, then
    :func:`fetch_model`: downloaded once per machine and identity when it is remote). Local
    directories are returned as they are."""
    return fetch_model(locate_model(source))


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
