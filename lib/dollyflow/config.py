"""Layered, typed configuration.

Layers, later wins::

    conf/defaults.yaml            shared defaults (spark, tables, model)
    conf/jobs/*.yaml              each job's own section (all of them, so every job sees one config)
    conf/model/<preset>.yaml      model preset (``--preset`` / ``DOLLYFLOW_PRESET``)
    conf/env/<env>.yaml           environment (``--env`` / ``DOLLYFLOW_ENV``: local, databricks, cluster)
    key=value                     command-line overrides (``dedupe.threshold=0.8``)

Every layer is checked against the dataclasses below: an unknown key or a value of the wrong
type fails with a message naming the key and the file (or override) it came from.
This module is engine-free: it never imports pyspark.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

DOLLY_CATEGORIES = [
    "open_qa", "closed_qa", "information_extraction", "summarization",
    "brainstorming", "classification", "creative_writing", "general_qa",
]


class ConfigError(ValueError):
    """A configuration value that cannot be accepted; the message names key and source."""


@dataclass
class SparkConfig:
    master: str = "local[2]"          # used only when no session exists and not under spark-submit
    app_name: str = "dollyflow"
    shuffle_partitions: int = 8       # local only; clusters keep their own setting
    ui: bool = False                  # local Spark UI on port 4040 when true
    log_level: str = "ERROR"
    driver_memory: str = "4g"         # local only
    conf: dict[str, str] = field(default_factory=dict)  # extra spark conf, applied locally


@dataclass
class TablesConfig:
    warehouse: str = "warehouse"      # local root for path-based tables (relative to the working dir)
    catalog: str = ""                 # Unity Catalog catalog; when set, tables are catalog.schema.table
    schema: str = "dollyflow"
    backend: str = "auto"             # auto | native | offline (delta-rs through a Spark Python data source)
    bronze: str = "bronze"
    quarantine: str = "quarantine"
    ingest_runs: str = "ingest_runs"
    silver: str = "silver"
    duplicates: str = "duplicates"
    dedupe_runs: str = "dedupe_runs"
    tokenized: str = "tokenized"
    tokenize_runs: str = "tokenize_runs"
    train_runs: str = "train_runs"
    predictions: str = "predictions"
    volume: str = "files"             # Unity Catalog Volume under catalog.schema for files (shards,
                                      # checkpoints, models) when catalog is set

    def files_root(self) -> str:
        """Where the jobs' files go (shards, checkpoints, models, reports): the Unity Catalog
        Volume ``/Volumes/<catalog>/<schema>/<volume>`` when a catalog is set, else the warehouse."""
        if self.catalog:
            return f"/Volumes/{self.catalog}/{self.schema}/{self.volume}"
        return require_warehouse(self.warehouse).rstrip("/")


@dataclass
class ModelConfig:
    name: str = "EleutherAI/pythia-2.8b"  # hub name or local path of the base model
    tokenizer: str = ""                    # empty: same as name
    max_length: int = 2048                 # the model's context length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.name


@dataclass
class IngestConfig:
    input: str = ""                        # a file, a directory or a glob; local path or cloud/Volume URI
    format: str = "auto"                   # auto (by extension) | json | csv | parquet
    field_map: dict[str, str] = field(default_factory=dict)  # dolly field -> column in the input
    categories: list[str] = field(default_factory=lambda: list(DOLLY_CATEGORIES))  # empty: any
    default_category: str = ""             # used when the input has no category column at all
    max_field_chars: int = 100_000         # a longer instruction/context/response is quarantined
    raw_max_chars: int = 2_000             # quarantined raw lines are truncated to this
    chunk_bytes: int = 32 * 1024 * 1024    # JSON Lines files are split into tasks of this size


@dataclass
class DedupeConfig:
    ngram: int = 2                         # word n-gram size of the shingles
    num_perm: int = 128                    # MinHash permutations (signature length)
    threshold: float = 0.7                 # near duplicates: Jaccard of instruction+response AND of context
                                           # (or both without context) at or above this
    bands: int | None = None               # LSH bands (of the instruction+response signature); None: chosen
                                           # from threshold and num_perm (with rows)
    rows: int | None = None                # rows per band; None: chosen with bands
    seed: int = 42                         # seed of the hash permutations
    bronze_version: int | None = None      # bronze version to read; None: the current one
    false_positive_weight: float = 0.2     # weights of the LSH error areas when bands/rows are chosen:
    false_negative_weight: float = 0.8     # candidates are verified, so missed pairs cost more than extra ones
    all_pairs_bucket: int = 8              # LSH buckets up to this size verify all pairs, larger ones a star
    max_cc_iterations: int = 40            # connected-components rounds before giving up (error)
    skip_unchanged: bool = True            # no new table versions when bronze version and parameters match the last run


@dataclass
class TokenizeConfig:
    tokenizer: str = ""                    # empty: model.tokenizer, else model.name (path or hub name)
    max_length: int | None = None          # None: model.max_length; longer prompts are dropped, not truncated
    test_size: float = 1000                # a count (whole number >= 1, Dolly: 1000; 1.0 is one record) or a
                                           # fraction in (0, 1); 0: no test split
    seed: int = 42                         # split hash seed
    num_shards: int = 8                    # Parquet shards per split, balanced by tokens
    output_dir: str = ""                   # shards root; empty: <tables.files_root()>/shards/<silver>
    keep_versions: int = 3                 # complete shard versions kept under the root (older ones pruned)
    allow_local_output: bool = False       # accept a plain local output path on a multi-host cluster
                                           # (only for a shared mount such as NFS)
    silver_version: int | None = None      # None: the current silver version
    mds: bool = False                      # also export Mosaic Streaming (needs mosaicml-streaming)
    skip_unchanged: bool = True            # write nothing when the current shards come from the same silver
                                           # version and settings and tokenized is still at their version


TRAIN_LAUNCHERS = ("torch_distributor", "torchrun", "horovod")
TRAIN_METHODS = ("full", "lora")
DEEPSPEED_PRESETS = ("auto", "a100", "a10", "v100", "cpu")
GPT_NEOX_LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@dataclass
class TrainConfig:
    """The train job (conf/jobs/train.yaml documents every key and marks Dolly's values)."""
    shard_dir: str = ""                    # a shard directory or a shards root; empty: shards_root(cfg)
    output_dir: str = ""                   # empty: <files_root>/models/<model>-<method>-<manifest sha8>
    checkpoint_dir: str = ""               # empty: <output_dir>/checkpoints
    overwrite: bool = False                # replace an output dir trained with a different fingerprint
    launcher: str = "torch_distributor"    # torch_distributor | torchrun | horovod
    processes: int = 0                     # ranks; 0: the GPUs the driver sees, else 1
    local_mode: bool = True                # TorchDistributor: ranks on the driver (true) or on executors
    use_gpu: bool | None = None            # None: true when CUDA is available where the ranks run
    deepspeed: str = "auto"                # auto | a100 | a10 | v100 | cpu | path to a DeepSpeed JSON
    zero_stage: int | None = None          # None: the preset's stage
    method: str = "full"                   # full | lora
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(GPT_NEOX_LORA_TARGETS))
    lora_train_new_tokens: bool = True     # also train the rows of Dolly's added tokens
    lora_save: str = "both"                # merged | adapter | both
    epochs: int = 2
    max_steps: int = 0                     # 0: all epochs
    learning_rate: float = 5e-6
    lr_scheduler: str = "constant"         # constant (after warmup) | cosine
    warmup_steps: int = 50
    warmup_type: str = "log"               # log | linear (DeepSpeed WarmupLR)
    min_lr_ratio: float = 0.0              # cosine: final lr / peak lr
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    batch_size: int = 6                    # records per micro-batch per rank
    batch_tokens: int = 0                  # > 0: token budget per micro-batch instead of batch_size
    eval_batch_size: int = 0               # 0: batch_size
    grad_accum: int = 1
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = True
    precision: str = "auto"                # auto | bf16 | fp16 | fp32
    seed: int = 42
    group_size: int = 64                   # length grouping: micro-batches per sorted bucket
    pad_to_multiple_of: int = 8
    eval_steps: int = 50
    save_steps: int = 200
    keep_checkpoints: int = 2
    log_steps: int = 10
    progress: str = "auto"                 # auto (bar on a terminal) | bar | log
    mlflow: bool = True
    mlflow_tracking_uri: str = ""          # empty: Databricks' server there, else <warehouse>/mlruns
    mlflow_experiment: str = ""            # empty: /Shared/dollyflow on Databricks, else dollyflow
    mlflow_log_model: bool = True          # log the model with MLflow's transformers flavour
    timeout_minutes: int = 30              # collective operations' timeout


@dataclass
class InferConfig:
    model: str = ""                        # train output dir, MLflow URI (runs:/, models:/), file/object-store URI or hub name
    input_table: str = "silver"            # logical table to score (used when query is empty)
    split: str = "test"                    # test | train | all: rows of input_table in that split of the tokenized table
    query: str = ""                        # SQL giving the rows to score instead (silver/tokenized are temp views)
    key_columns: list[str] = field(default_factory=lambda: ["record_id"])  # identify a row in predictions
    extra_columns: list[str] = field(default_factory=list)  # more input columns copied to predictions
    instruction_column: str = "instruction"
    context_column: str = "context"        # empty: no context
    limit: int | None = None               # score at most this many rows (smoke runs)
    mode: str = "append"                   # append (skip rows already predicted) | overwrite
    retry_errors: bool = True              # append: regenerate rows whose earlier prediction is an error
    function_name: str = "dolly_generate"  # SQL name given by register_udf
    max_new_tokens: int = 256              # Dolly: 256
    do_sample: bool = False                # Dolly: true (we default to greedy: reproducible batch scoring)
    temperature: float = 1.0               # Dolly: 1.0 (transformers' default)
    top_p: float = 0.92                    # Dolly: 0.92
    top_k: int = 0                         # Dolly: 0 (off)
    seed: int = 42                         # base of the per-row sampling seeds
    device: str = "auto"                   # auto (the task's GPU when there is one, else cpu) | cpu | cuda | cuda:N
    dtype: str = "auto"                    # auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on cpu) | float32 | bfloat16 | float16
    batch_tokens: int = 16384              # rows x (longest prompt + max_new_tokens) per batch
    max_batch_size: int = 64               # rows per batch at most
    window_rows: int = 256                 # rows sorted by prompt length together
    partitions: int = 0                    # tasks to spread the rows over; 0: the session's default parallelism


@dataclass
class Config:
    job: str = ""
    run_id: str = ""        # empty: generated per run
    preset: str = ""
    env: str = ""
    spark: SparkConfig = field(default_factory=SparkConfig)
    tables: TablesConfig = field(default_factory=TablesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every key and value, secrets included: for this process only. What is written or
        logged anywhere (run records, model directories, MLflow, job output) is
        :meth:`redacted`."""
        return dataclasses.asdict(self)

    def redacted(self) -> dict[str, Any]:
        """:meth:`to_dict` safe to write where others can read it: every ``spark.conf`` value
        (where people put ``spark.hadoop.fs.s3a.secret.key``) replaced by ``***``, and every
        URI's user info and secret-looking query values (:func:`redact_uri`) too."""
        d = redact(self.to_dict())
        d["spark"]["conf"] = {k: REDACTED for k in self.spark.conf}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# secrets: what may be written where others read it

REDACTED = "***"
#: Query keys whose values are secrets (matched case-insensitively inside the key: ``sig``,
#: ``X-Amz-Signature``, ``access_token``, ``sas_token``, ``password``, ``secret_key`` ...).
SECRET_QUERY_WORDS = ("key", "secret", "token", "sas", "password", "passwd", "pwd", "sig", "credential",
                      "auth")
_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s'\"<>]*)")


def _secret_key(name: str) -> bool:
    name = name.lower()
    return any(w in name for w in SECRET_QUERY_WORDS)


def _redact_one(m: re.Match) -> str:
    rest = m.group("rest")
    rest, hash_, fragment = rest.partition("#")
    rest, q, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = REDACTED + "@" + authority.rsplit("@", 1)[1]
    if q:
        parts = []
        for part in query.split("&"):
            k, eq, v = part.partition("=")
            parts.append(f"{k}={REDACTED}" if eq and v and _secret_key(k) else part)
        query = "&".join(parts)
    return m.group("scheme") + authority + slash + path + q + query + hash_ + fragment


def redact_uri(text: str) -> str:
    """``text`` with every URI's user info (``s3a://KEY:SECRET@bucket``) and the values of its
    secret-looking query keys (``?sig=...``, ``?token=...``, ``?password=...``; see
    :data:`SECRET_QUERY_WORDS`) replaced by ``***``; anything else is unchanged."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URI.sub(_redact_one, text)


def redact(obj: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with :func:`redact_uri`
    applied to every string (dict keys included)."""
    if isinstance(obj, str):
        return redact_uri(obj)
    if isinstance(obj, dict):
        return {redact(k): redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj) if isinstance(obj, list) else tuple(redact(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# locating conf/


def conf_dir() -> Path:
    """The conf directory: $DOLLYFLOW_CONF, the checkout's conf/, or the copy inside the wheel."""
    env = os.environ.get("DOLLYFLOW_CONF")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    checkout = here.parent.parent / "conf"
    if (checkout / "defaults.yaml").is_file():
        return checkout
    packaged = here / "_conf"
    if (packaged / "defaults.yaml").is_file():
        return packaged
    raise ConfigError(f"no conf directory found (looked at {checkout} and {packaged}); set DOLLYFLOW_CONF")


def available(kind: str) -> list[str]:
    """Names of the presets (kind='model'), environments ('env') or jobs ('jobs') in conf/."""
    return sorted(p.stem for p in (conf_dir() / kind).glob("*.yaml"))


# --------------------------------------------------------------------------------------------
# typed merging


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r} ({source})")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} (from {source})")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} (from {source})")
        return {_coerce(k, kt, f"{key} key", source): _coerce(v, vt, f"{key}.{k}", source)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            return float(value)   # YAML 1.1 reads 5e-6 (no dot) as a string; a number was meant
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)   # yaml reads run_id=20240101 as an int; a string was meant
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r} (from {source})")


def _merge(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Merge a mapping into a dataclass instance in place, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'top level'}: expected a mapping (from {source})")
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown key '{dotted}' (from {source}); known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, source, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted, source))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=(.*)$", re.S)


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> {"a": {"b": value}}.

    The value is taken whole, as a string, unless the whole of it is one YAML scalar or flow
    collection: ``0.8``, ``5e-6``, ``true``, ``null`` (and an empty value: ""), ``20240101``, a
    quoted string (``'x: y'``), ``[a, b]``, ``{k: v}``. So a SQL query or a path that holds
    ``: `` or `` #`` (``infer.query=SELECT a FROM t WHERE x = 'a: b' # c``) is never cut at a
    YAML comment nor read as a mapping; a plain word stays the text typed, and a value YAML
    would make a date (``2024-01-01``) stays a string."""
    m = _OVERRIDE.match(text)
    if not m:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = m.groups()
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = _override_value(raw)
    return out


_YAML_SCALARS = (bool, int, float, type(None))


def _override_value(raw: str) -> Any:
    """The typed value of an override's right-hand side (see :func:`parse_override`)."""
    if not raw.strip():
        return ""
    try:
        loader = yaml.SafeLoader(raw)
        try:
            node = loader.get_single_node()     # one document, or an error
            if node is None:
                return raw
            # the node must span the whole value: "a # c" is the scalar "a" and a comment
            if raw[node.end_mark.index:].strip():
                return raw
            if isinstance(node, yaml.ScalarNode):
                value = loader.construct_document(node)
                if node.style in ("'", '"'):
                    return value                  # quoted: the string meant
                if value is None and raw.strip() not in ("null", "Null", "NULL", "~"):
                    return raw                    # "&x" (an anchor of nothing) is text
                return value if isinstance(value, _YAML_SCALARS) else raw
            if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) and node.flow_style:
                return loader.construct_document(node)
            return raw                              # a block mapping or list: "a: b" is text
        finally:
            loader.dispose()
    except yaml.YAMLError:
        return raw


def new_run_id(job: str = "") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{job + '-' if job else ''}{stamp}-{uuid.uuid4().hex[:8]}"


def load_config(job: str = "", overrides: list[str] | tuple[str, ...] = (), preset: str | None = None,
                env: str | None = None, conf: str | Path | None = None) -> Config:
    """Resolve the layered configuration for ``job``.

    ``preset``/``env`` default to $DOLLYFLOW_PRESET/$DOLLYFLOW_ENV, then to the values in
    defaults.yaml. Overrides may also set ``preset=`` and ``env=`` themselves.
    """
    root = Path(conf) if conf else conf_dir()
    cfg = Config(job=job)
    defaults = root / "defaults.yaml"
    if defaults.is_file():
        _merge(cfg, _read_yaml(defaults), str(defaults))
    for path in sorted((root / "jobs").glob("*.yaml")):
        _merge(cfg, _read_yaml(path), str(path))
    parsed = [(o, parse_override(o)) for o in overrides]
    for o, data in parsed:  # selection keys first, so an override can pick the preset or env
        for sel in ("preset", "env"):
            if sel in data:
                _merge(cfg, {sel: data[sel]}, f"override {o!r}")
    cfg.preset = preset or os.environ.get("DOLLYFLOW_PRESET") or cfg.preset
    cfg.env = env or os.environ.get("DOLLYFLOW_ENV") or cfg.env
    for kind, name in (("model", cfg.preset), ("env", cfg.env)):
        if not name:
            continue
        path = root / kind / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown {'preset' if kind == 'model' else 'env'} {name!r}: "
                              f"no {path}; available: {', '.join(available(kind)) or 'none'}")
        _merge(cfg, _read_yaml(path), str(path))
    for o, data in parsed:
        _merge(cfg, data, f"override {o!r}")
    cfg.job = job
    if not cfg.run_id:
        cfg.run_id = new_run_id(job)
    validate(cfg)
    return cfg


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def check_identifier(value: str, what: str) -> str:
    """Table, schema and catalog names must be plain identifiers (no quoting, no dots, no SQL)."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise ConfigError(f"{what}: {value!r} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return value


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_name(value: str, what: str) -> str:
    """A name that becomes one path segment (``run_id``: staging, shard and status directories)
    must be a plain name: letters, digits, ``_ . -``, not starting with ``.``, never ``.`` or
    ``..`` or anything holding ``..``, no separator (``/``, ``\\``, ``:``). Otherwise ``run_id=..``
    would make ``<schema>/_staging/<run_id>`` the schema directory itself."""
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise ConfigError(f"{what}: {value!r} is not a plain name (letters, digits and _ . -, starting with a "
                          "letter, digit or _, no '..', no '/', '\\' or ':'): it becomes a directory name")
    return value


def validate(cfg: Config) -> None:
    t = cfg.tables
    for f in dataclasses.fields(TablesConfig):
        if f.name in ("warehouse", "backend", "catalog"):
            continue
        check_identifier(getattr(t, f.name), f"tables.{f.name}")
    if t.catalog:
        check_identifier(t.catalog, "tables.catalog")
    if t.backend not in ("auto", "native", "offline"):
        raise ConfigError(f"tables.backend: {t.backend!r} is not one of auto, native, offline")
    if cfg.ingest.format not in ("auto", "json", "csv", "parquet"):
        raise ConfigError(f"ingest.format: {cfg.ingest.format!r} is not one of auto, json, csv, parquet")
    bad = set(cfg.ingest.field_map) - {"instruction", "context", "response", "category"}
    if bad:
        raise ConfigError(f"ingest.field_map: unknown target field(s) {sorted(bad)}; "
                          "targets are instruction, context, response, category")
    inf = cfg.infer
    if inf.mode not in ("append", "overwrite"):
        raise ConfigError(f"infer.mode: {inf.mode!r} is not one of append, overwrite")
    if inf.split not in ("test", "train", "all"):
        raise ConfigError(f"infer.split: {inf.split!r} is not one of test, train, all")
    if not inf.key_columns:
        raise ConfigError("infer.key_columns: at least one key column is needed")
    for k in [*inf.key_columns, *inf.extra_columns, inf.instruction_column] + \
             ([inf.context_column] if inf.context_column else []):
        check_identifier(k, "infer column")
    check_identifier(inf.function_name, "infer.function_name")
    for key in ("max_new_tokens", "batch_tokens", "max_batch_size", "window_rows"):
        if getattr(inf, key) < 1:
            raise ConfigError(f"infer.{key} must be >= 1, got {getattr(inf, key)}")
    if inf.partitions < 0 or (inf.limit is not None and inf.limit < 0):
        raise ConfigError("infer.partitions and infer.limit must not be negative")
    if inf.do_sample and not (inf.temperature > 0 and 0 < inf.top_p <= 1 and inf.top_k >= 0):
        raise ConfigError("infer: sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
    check_name(cfg.run_id, "run_id")
    check_ranges(cfg)
    validate_train(cfg.train)


def _positive(value: Any, key: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value!r}")


def check_ranges(cfg: Config) -> None:
    """Numeric settings that type checks alone cannot catch, each error naming its key."""
    import math

    from dollyflow.core.split import parse_test_size

    for key, value in (("spark.shuffle_partitions", cfg.spark.shuffle_partitions),
                       ("ingest.max_field_chars", cfg.ingest.max_field_chars),
                       ("ingest.raw_max_chars", cfg.ingest.raw_max_chars),
                       ("ingest.chunk_bytes", cfg.ingest.chunk_bytes),
                       ("dedupe.ngram", cfg.dedupe.ngram),
                       ("dedupe.num_perm", cfg.dedupe.num_perm),
                       ("dedupe.bands", cfg.dedupe.bands),
                       ("dedupe.rows", cfg.dedupe.rows),
                       ("dedupe.max_cc_iterations", cfg.dedupe.max_cc_iterations),
                       ("model.max_length", cfg.model.max_length),
                       ("tokenize.max_length", cfg.tokenize.max_length),
                       ("tokenize.num_shards", cfg.tokenize.num_shards),
                       ("tokenize.keep_versions", cfg.tokenize.keep_versions)):
        _positive(value, key)
    for key, value in (("dedupe.bronze_version", cfg.dedupe.bronze_version),
                       ("tokenize.silver_version", cfg.tokenize.silver_version)):
        _positive(value, key, minimum=0)
    d = cfg.dedupe
    if not (math.isfinite(d.threshold) and 0 < d.threshold < 1):
        raise ConfigError(f"dedupe.threshold: must lie strictly between 0 and 1 (a Jaccard similarity), "
                          f"got {d.threshold!r}")
    for key, value in (("dedupe.false_positive_weight", d.false_positive_weight),
                       ("dedupe.false_negative_weight", d.false_negative_weight)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key}: must be a finite number >= 0, got {value!r}")
    if d.false_positive_weight + d.false_negative_weight <= 0:
        raise ConfigError("dedupe.false_positive_weight + dedupe.false_negative_weight: must be > 0")
    try:
        parse_test_size(cfg.tokenize.test_size)
    except ValueError as exc:
        raise ConfigError(f"tokenize.test_size: {exc}") from None


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _at_least(key: str, value, low, *, strict: bool = False) -> None:
    if value is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{key}: {value!r} must be {'>' if strict else '>='} {low}")


def validate_train(t: TrainConfig) -> None:
    """Range checks of the ``train:`` section; each error names its key."""
    _one_of("train.launcher", t.launcher, TRAIN_LAUNCHERS)
    _one_of("train.method", t.method, TRAIN_METHODS)
    _one_of("train.lora_save", t.lora_save, ("merged", "adapter", "both"))
    _one_of("train.lr_scheduler", t.lr_scheduler, ("constant", "cosine"))
    _one_of("train.warmup_type", t.warmup_type, ("log", "linear"))
    _one_of("train.precision", t.precision, ("auto", "bf16", "fp16", "fp32"))
    _one_of("train.progress", t.progress, ("auto", "bar", "log"))
    if t.zero_stage is not None:
        _one_of("train.zero_stage", t.zero_stage, (0, 1, 2, 3))
    if not t.deepspeed:
        raise ConfigError("train.deepspeed: empty; use auto, a preset "
                          f"({', '.join(DEEPSPEED_PRESETS[1:])}) or a path to a DeepSpeed JSON file")
    for key in ("processes", "max_steps", "batch_tokens", "eval_batch_size", "warmup_steps", "keep_checkpoints"):
        _at_least(f"train.{key}", getattr(t, key), 0)
    for key in ("epochs", "batch_size", "grad_accum", "group_size", "pad_to_multiple_of", "eval_steps",
                "save_steps", "log_steps", "lora_r", "timeout_minutes"):
        _at_least(f"train.{key}", getattr(t, key), 1)
    for key in ("learning_rate", "lora_alpha", "adam_eps"):
        _at_least(f"train.{key}", getattr(t, key), 0, strict=True)
    for key in ("weight_decay", "gradient_clipping"):
        _at_least(f"train.{key}", getattr(t, key), 0)
    for key in ("lora_dropout", "adam_beta1", "adam_beta2", "min_lr_ratio"):
        v = getattr(t, key)
        if not 0 <= v < 1 and not (key == "min_lr_ratio" and v == 1):
            raise ConfigError(f"train.{key}: {v!r} must be in [0, 1)")
    if t.method == "lora" and not t.lora_target_modules:
        raise ConfigError("train.lora_target_modules: empty; LoRA needs at least one module name")


def require_warehouse(warehouse: str) -> str:
    """The warehouse, or a clear error when none is set (the cluster env leaves it to the user)."""
    if not warehouse:
        raise ConfigError("tables.warehouse is empty: set it to shared storage every executor can reach, "
                          "e.g. tables.warehouse=s3://bucket/dollyflow (or abfss://, gs://, hdfs://)")
    return warehouse


def shards_root(cfg: Config) -> str:
    """The tokenize job's shards root: ``tokenize.output_dir``, else ``<files root>/shards/<silver>``.
    Each run writes a versioned directory under it and switches its ``LATEST.json`` pointer."""
    if cfg.tokenize.output_dir:
        return cfg.tokenize.output_dir.rstrip("/")
    return f"{cfg.tables.files_root()}/shards/{cfg.tables.silver}"


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin wrapper
    argv = list(sys.argv[1:] if argv is None else argv)
    job = argv.pop(0) if argv and "=" not in argv[0] else ""
    print(load_config(job, argv).to_yaml())
    return 0
