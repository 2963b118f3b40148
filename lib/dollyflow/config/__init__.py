"""Layered, typed configuration: the public names of the config package.

Layers, later wins (:mod:`~dollyflow.config.loading`): conf/defaults.yaml, conf/jobs/*.yaml, the
model preset, the environment, key=value overrides.

Every layer is checked against the dataclasses of :mod:`~dollyflow.config.schema`: an unknown key
or a value of the wrong type fails with a message naming the key and the file (or override) it
came from. The package is engine-free: it never imports pyspark.

    schema.py       the dataclasses, each field with its doc and default; files_root, shards_root
    loading.py      conf/ discovery, YAML layering, overrides, load_config
    validation.py   value checks (check_identifier, check_name, validate)
    redaction.py    REDACTED, redact, redact_uri
    reference.py    describe(job): a job's settings as commented YAML
    runtime.py      on_databricks
    errors.py       ConfigError
"""
from __future__ import annotations

from dollyflow.config.errors import ConfigError
from dollyflow.config.loading import available, conf_dir, load_config, load_defaults, new_run_id, parse_override
from dollyflow.config.redaction import REDACTED, SECRET_QUERY_WORDS, redact, redact_uri
from dollyflow.config.reference import describe
from dollyflow.config.runtime import on_databricks
from dollyflow.config.schema import (DEEPSPEED_PRESETS, DOLLY_CATEGORIES, GPT_NEOX_LORA_TARGETS, TRAIN_LAUNCHERS,
                                     TRAIN_METHODS, Config, DedupeConfig, EvaluateConfig, FilterConfig, IngestConfig, InferConfig, ModelConfig,
                                     SparkConfig, StorageConfig, TablesConfig, TokenizeConfig, TrainConfig, require_warehouse,
                                     shards_root)
from dollyflow.config.validation import check_identifier, check_name, check_ranges, validate, validate_train

__all__ = [
    # schema
    "Config", "SparkConfig", "TablesConfig", "ModelConfig", "IngestConfig", "DedupeConfig", "TokenizeConfig",
    "TrainConfig", "InferConfig", "EvaluateConfig", "StorageConfig", "FilterConfig", "DOLLY_CATEGORIES", "TRAIN_LAUNCHERS", "TRAIN_METHODS", "DEEPSPEED_PRESETS",
    "GPT_NEOX_LORA_TARGETS", "require_warehouse", "shards_root",
    # loading
    "ConfigError", "conf_dir", "available", "parse_override", "new_run_id", "load_defaults", "load_config",
    # validation
    "check_identifier", "check_name", "check_ranges", "validate", "validate_train",
    # redaction
    "REDACTED", "SECRET_QUERY_WORDS", "redact", "redact_uri",
    # reference, runtime
    "describe", "on_databricks",
]
