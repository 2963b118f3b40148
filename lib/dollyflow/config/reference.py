"""The configuration reference: describe(job), a job's settings as commented YAML, each key with
the documentation of its field and its default."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import yaml

from dollyflow.config.errors import ConfigError
from dollyflow.config.loading import available, load_defaults
from dollyflow.config.schema import Config

#: The top-level keys a layer may set (``job`` is the command's, never a layer's).
TOP_LEVEL = ("run_id", "preset", "env")
#: The sections every job reads.
SHARED_SECTIONS = ("spark", "tables", "storage")
#: The sections each job reads besides the shared ones (train finds its shards through
#: tokenize.output_dir; tokenize and infer tokenize with the model's tokenizer).
JOB_SECTIONS = {
    "ingest": ("ingest",),
    "dedupe": ("dedupe",),
    "filter": ("filter",),
    "tokenize": ("model", "tokenize", "prompt"),
    "train": ("model", "tokenize", "train"),
    "infer": ("model", "infer"),
    "evaluate": ("evaluate",),
}
WIDTH = 100


def describe(job: str, conf: str | Path | None = None) -> str:
    """``job``'s configuration as commented YAML: the top-level keys, the shared sections (spark,
    tables) and the job's own, every key under a comment with its field's documentation, set to
    its default (the dataclass default, which conf/defaults.yaml and conf/jobs/*.yaml repeat;
    ``preset`` and ``env`` as defaults.yaml selects them). ``yaml.safe_load`` of the text gives
    those defaults back; a preset, an env and overrides may change them (``dollyflow config
    <job>`` prints the resolved values)."""
    if job not in JOB_SECTIONS:
        raise ConfigError(f"unknown job {job!r}; jobs: {', '.join(JOB_SECTIONS)}")
    cfg = load_defaults(job, conf)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    lines = [*_comment(f"dollyflow config {job}: every setting the {job} job reads, with its default. "
                       "Layers, later wins: conf/defaults.yaml <- conf/jobs/*.yaml <- conf/model/<preset>.yaml "
                       "<- conf/env/<env>.yaml <- key=value overrides. Unknown keys fail.", ""),
             *_comment(f"presets: {', '.join(available('model', conf))}; envs: {', '.join(available('env', conf))}",
                       "")]
    for name in TOP_LEVEL:
        lines += ["", *_setting(fields[name], getattr(cfg, name), "")]
    for section in (*SHARED_SECTIONS, *JOB_SECTIONS[job]):
        value = getattr(cfg, section)
        lines += ["", *_comment(fields[section].metadata["doc"], ""), f"{section}:"]
        for f in dataclasses.fields(value):
            lines += _setting(f, getattr(value, f.name), "  ")
    return "\n".join(lines) + "\n"


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width=WIDTH, initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}# ", break_long_words=False, break_on_hyphens=False)


def _setting(f: dataclasses.Field, value: Any, indent: str) -> list[str]:
    return [*_comment(f.metadata["doc"], indent), f"{indent}{f.name}: {_flow(value)}"]


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (a flow list or mapping for collections)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...")
