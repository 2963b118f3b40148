"""Value checks beyond types: check_identifier, check_name, and validate (ranges and allowed
values of every section), each error naming its key."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from dollyflow.config.errors import ConfigError
from dollyflow.config.schema import (BASELINES, DEEPSPEED_PRESETS, PII_ACTIONS, PII_KINDS, PROMPT_FORMATS, TRAIN_LAUNCHERS, TRAIN_METHODS, Config, TablesConfig,
                                     TrainConfig)
from dollyflow.core.split import parse_test_size

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
    """Every check of a resolved configuration (after all layers); the first failure raises."""
    t = cfg.tables
    for f in dataclasses.fields(TablesConfig):
        if f.name in ("warehouse", "backend", "catalog", "shared_mounts"):
            continue
        check_identifier(getattr(t, f.name), f"tables.{f.name}")
    if t.catalog:
        check_identifier(t.catalog, "tables.catalog")
    if t.backend not in ("auto", "native", "offline"):
        raise ConfigError(f"tables.backend: {t.backend!r} is not one of auto, native, offline")
    check_delta_packages(cfg.spark.delta_packages)
    for m in t.shared_mounts:
        if not isinstance(m, str) or "://" in m or m.startswith("dbfs:") or not m.startswith("/"):
            raise ConfigError(f"tables.shared_mounts: {m!r} is not an absolute local path (a mount point every "
                              "node sees, e.g. /mnt/shared; URIs are shared already)")
    check_storage(cfg.storage)
    if cfg.ingest.format not in ("auto", "json", "csv", "parquet"):
        raise ConfigError(f"ingest.format: {cfg.ingest.format!r} is not one of auto, json, csv, parquet")
    bad = set(cfg.ingest.field_map) - {"instruction", "context", "response", "category"}
    if bad:
        raise ConfigError(f"ingest.field_map: unknown target field(s) {sorted(bad)}; "
                          "targets are instruction, context, response, category")
    if cfg.prompt.format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt.format: {cfg.prompt.format!r} is not one of {', '.join(PROMPT_FORMATS)}")
    if cfg.prompt.system and cfg.prompt.format != "chat_template":
        raise ConfigError("prompt.system: a system prompt needs prompt.format=chat_template (Dolly's prompt has "
                          "no system turn)")
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
    if inf.engine not in ("torch", "ctranslate2", "auto"):
        raise ConfigError(f"infer.engine: {inf.engine!r} is not one of torch, ctranslate2, auto")
    compute_types = ("default", "float32", "int8", "int8_float16", "bfloat16", "float16")
    if inf.compute_type not in compute_types:
        raise ConfigError(f"infer.compute_type: {inf.compute_type!r} is not one of {', '.join(compute_types)}")
    if inf.ct2_threads < 0:
        raise ConfigError(f"infer.ct2_threads must not be negative, got {inf.ct2_threads}")
    if inf.partitions < 0 or (inf.limit is not None and inf.limit < 0):
        raise ConfigError("infer.partitions and infer.limit must not be negative")
    if inf.do_sample and not (inf.temperature > 0 and 0 < inf.top_p <= 1 and inf.top_k >= 0):
        raise ConfigError("infer: sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
    validate_evaluate(cfg)
    check_name(cfg.run_id, "run_id")
    check_ranges(cfg)
    validate_filter(cfg)
    validate_train(cfg.train)


_COORDINATE = re.compile(r"^[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+:[A-Za-z0-9_.+-]+$")


def check_delta_packages(value: str) -> None:
    """spark.delta_packages: auto, off, or Maven coordinates group:artifact:version (comma-separated)."""
    if value in ("auto", "off"):
        return
    coords = [c.strip() for c in str(value).split(",")]
    bad = [c for c in coords if not _COORDINATE.match(c)]
    if not value or bad:
        raise ConfigError(f"spark.delta_packages: {value!r} is not auto, off or Maven coordinates "
                          "group:artifact:version (e.g. io.delta:delta-spark_4.2_2.13:4.4.0)")


_HEX = re.compile(r"^[0-9a-f]{1,64}$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


def validate_evaluate(cfg: Config) -> None:
    """Range checks of the ``evaluate:`` section; each error names its key."""
    e = cfg.evaluate
    for i, m in enumerate(e.models):
        if not isinstance(m, str) or not m.strip():
            raise ConfigError(f"evaluate.models[{i}]: {m!r} is not a model_sha, model directory, model or run id")
    for p in e.params_sha:
        if not isinstance(p, str) or not _HEX.match(p):
            raise ConfigError(f"evaluate.params_sha: {p!r} is not a params_sha (lowercase hex, as in predictions)")
    if e.seed < 0:
        raise ConfigError(f"evaluate.seed: must be >= 0, got {e.seed}")
    if e.resamples < 1:
        raise ConfigError(f"evaluate.resamples: must be >= 1, got {e.resamples}")
    if not (math.isfinite(e.level) and 0 < e.level < 1):
        raise ConfigError(f"evaluate.level: must lie strictly between 0 and 1, got {e.level!r}")
    if e.partitions < 0:
        raise ConfigError(f"evaluate.partitions: must not be negative, got {e.partitions}")
    if e.silver_version is not None and e.silver_version < 0:
        raise ConfigError(f"evaluate.silver_version: must be >= 0, got {e.silver_version}")
    for i, t in enumerate(e.harness_tasks):
        if not isinstance(t, str) or not t.strip():
            raise ConfigError(f"evaluate.harness_tasks[{i}]: {t!r} is neither an lm-eval task name nor a path")
    if e.harness_limit is not None and e.harness_limit < 1:
        raise ConfigError(f"evaluate.harness_limit: must be >= 1 or null, got {e.harness_limit}")
    if e.harness_batch_size < 1:
        raise ConfigError(f"evaluate.harness_batch_size: must be >= 1, got {e.harness_batch_size}")
    if not _DEVICE.match(str(e.harness_device)):
        raise ConfigError(f"evaluate.harness_device: {e.harness_device!r} is not one of auto, cpu, cuda, cuda:<i>")
    if e.judge_against not in ("baseline", "reference"):
        raise ConfigError(f"evaluate.judge_against: {e.judge_against!r} is not one of baseline, reference")
    for key in ("judge_max_new_tokens", "judge_batch_tokens", "judge_max_batch_size", "judge_window_rows"):
        if getattr(e, key) < 1:
            raise ConfigError(f"evaluate.{key} must be >= 1, got {getattr(e, key)}")
    if not re.match(r"^(auto|cpu|cuda|cuda:\d+)$", str(e.judge_device)):
        raise ConfigError(f"evaluate.judge_device: {e.judge_device!r} is not one of auto, cpu, cuda, cuda:N")
    if e.judge_dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        raise ConfigError(f"evaluate.judge_dtype: {e.judge_dtype!r} is not one of auto, float32, bfloat16, float16")
    if not isinstance(e.judge_model, str):
        raise ConfigError(f"evaluate.judge_model: {e.judge_model!r} is not a model source (a directory, an MLflow "
                          "URI or a hub name; empty: no judge)")
    if e.baseline not in BASELINES:
        raise ConfigError(f"evaluate.baseline: must be one of {', '.join(BASELINES)}, got {e.baseline!r}")


def _positive(value: Any, key: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value!r}")


def check_ranges(cfg: Config) -> None:
    """Numeric settings that type checks alone cannot catch, each error naming its key."""
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


def check_storage(st) -> None:
    """storage: an endpoint is a URL (http:// or https://, or host[:port]); the *_env keys are
    environment variable names; hadoop_aws is auto, off or Maven coordinates."""
    ep = st.endpoint
    if ep and (any(c.isspace() for c in ep) or ("://" in ep and not ep.startswith(("http://", "https://")))
               or "@" in ep):
        raise ConfigError(f"storage.endpoint: {ep!r} is not an http(s):// URL or host[:port] (credentials never go "
                          "here: set storage.access_key_env / storage.secret_key_env)")
    for key in ("access_key_env", "secret_key_env"):
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", getattr(st, key)):
            raise ConfigError(f"storage.{key}: {getattr(st, key)!r} is not an environment variable name")
    if st.hadoop_aws not in ("auto", "off"):
        bad = [c for c in st.hadoop_aws.split(",") if not _COORDINATE.match(c.strip())]
        if bad:
            raise ConfigError(f"storage.hadoop_aws: {st.hadoop_aws!r} is not auto, off or Maven coordinates")


def validate_filter(cfg: Config) -> None:
    """Range checks of the ``filter:`` section and tokenize's source table; each error names its key.
    Language codes are checked against the detector's own list when the filter job starts
    (:mod:`dollyflow.core.filtering.language`), benchmark files when it opens them."""
    f = cfg.filter
    _one_of("tokenize.source_table", cfg.tokenize.source_table, ("curated", "silver"))
    for kind, action in f.pii.items():
        _one_of("filter.pii (kind)", kind, PII_KINDS)
        _one_of(f"filter.pii.{kind}", action, PII_ACTIONS)
    if f.pii.get("person", "off") != "off":
        raise ConfigError("filter.pii.person: person names need a name model (an NLP engine), which dollyflow "
                          "does not download; only off is accepted")
    for key in ("pii_min_score", "dup_line_frac", "top_ngram_frac", "dup_ngram_frac", "min_alpha_words"):
        value = getattr(f, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
            raise ConfigError(f"filter.{key}: must lie between 0 and 1, got {value!r}")
    if not (math.isfinite(f.length_z) and f.length_z > 0):
        raise ConfigError(f"filter.length_z: must be a finite number > 0, got {f.length_z!r}")
    for key in ("language_min_chars", "min_response_words", "repetition_min_words", "alpha_min_words",
                "length_min_records"):
        _at_least(f"filter.{key}", getattr(f, key), 0)
    _at_least("filter.ngram", f.ngram, 1)
    _at_least("filter.silver_version", f.silver_version, 0)
    if not f.languages:
        raise ConfigError("filter.languages: at least one language to keep is needed (ISO 639-1, e.g. en)")
    if f.decontaminate and not f.decontaminate_fields:
        raise ConfigError("filter.decontaminate_fields: empty while filter.decontaminate names benchmark files")
