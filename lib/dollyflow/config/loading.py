"""Loading a configuration: conf/ discovery, YAML layering (defaults, jobs, preset, env),
key=value overrides, each layer merged with its keys and types checked, then validated.

Layers, later wins::

    conf/defaults.yaml            shared defaults (spark, tables, model)
    conf/jobs/*.yaml              each job's own section (all of them, so every job sees one config)
    conf/model/<preset>.yaml      model preset (``--preset`` / ``DOLLYFLOW_PRESET``)
    conf/env/<env>.yaml           environment (``--env`` / ``DOLLYFLOW_ENV``: local, databricks, cluster)
    key=value                     command-line overrides (``dedupe.threshold=0.8``)

An unknown key or a value of the wrong type fails with a message naming the key and the file
(or override) it came from.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from dollyflow.config.errors import ConfigError
from dollyflow.config.schema import Config
from dollyflow.config.validation import validate

# --------------------------------------------------------------------------------------------
# locating conf/


def conf_dir() -> Path:
    """The conf directory: $DOLLYFLOW_CONF, the checkout's conf/, or the copy inside the wheel."""
    env = os.environ.get("DOLLYFLOW_CONF")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent    # the dollyflow package
    checkout = here.parent.parent / "conf"
    if (checkout / "defaults.yaml").is_file():
        return checkout
    packaged = here / "_conf"
    if (packaged / "defaults.yaml").is_file():
        return packaged
    raise ConfigError(f"no conf directory found (looked at {checkout} and {packaged}); set DOLLYFLOW_CONF")

def available(kind: str, conf: str | Path | None = None) -> list[str]:
    """Names of the presets (kind='model'), environments ('env') or jobs ('jobs') in conf/."""
    root = Path(conf) if conf else conf_dir()
    return sorted(p.stem for p in (root / kind).glob("*.yaml"))


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


def load_defaults(job: str = "", conf: str | Path | None = None) -> Config:
    """The first two layers alone: the dataclass defaults with conf/defaults.yaml and every
    conf/jobs/*.yaml merged in (no preset, env or override; not validated, no run id)."""
    root = Path(conf) if conf else conf_dir()
    cfg = Config(job=job)
    defaults = root / "defaults.yaml"
    if defaults.is_file():
        _merge(cfg, _read_yaml(defaults), str(defaults))
    for path in sorted((root / "jobs").glob("*.yaml")):
        _merge(cfg, _read_yaml(path), str(path))
    return cfg


def load_config(job: str = "", overrides: list[str] | tuple[str, ...] = (), preset: str | None = None,
                env: str | None = None, conf: str | Path | None = None) -> Config:
    """Resolve the layered configuration for ``job``.

    ``preset``/``env`` default to $DOLLYFLOW_PRESET/$DOLLYFLOW_ENV, then to the values in
    defaults.yaml. Overrides may also set ``preset=`` and ``env=`` themselves.
    """
    root = Path(conf) if conf else conf_dir()
    cfg = load_defaults(job, root)
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
