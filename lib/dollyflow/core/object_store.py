"""The object store's endpoint and credentials, from one place (the ``storage:`` config section),
for every client that touches it: pyarrow (shards, models, reports), delta-rs (the offline
Delta backend) and Spark's ``s3a://`` (Hadoop ``fs.s3a.*``, native Delta).

The config never holds a secret: ``storage.access_key_env`` / ``storage.secret_key_env`` name the
environment variables that do (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` by default).
:func:`activate` puts the non-secret settings into ``$DOLLYFLOW_S3`` (JSON) of this process, so the
processes it starts (Spark's Python workers of a local session, training ranks) read the same
settings; :func:`active` reads them back. Without a ``storage.endpoint`` nothing is activated and
every client keeps its own defaults (the AWS default credential chain, an instance profile).
"""
from __future__ import annotations

import json
import os

#: The environment variable carrying the active settings (no secrets) to child processes.
ENV = "DOLLYFLOW_S3"
S3_SCHEMES = ("s3://", "s3a://", "s3n://")


def is_s3(path: str) -> bool:
    return str(path).startswith(S3_SCHEMES)


def settings_of(storage) -> dict | None:
    """The settings of a ``StorageConfig`` as a plain dict (None when no endpoint is set)."""
    if not storage or not storage.endpoint:
        return None
    endpoint = storage.endpoint.rstrip("/")
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    return {"endpoint": endpoint, "region": storage.region or "us-east-1", "path_style": bool(storage.path_style),
            "access_key_env": storage.access_key_env, "secret_key_env": storage.secret_key_env}


def activate(storage) -> dict | None:
    """Make ``storage``'s settings this process's (and its children's) object-store settings;
    returns them (None, and nothing changed, when ``storage.endpoint`` is empty)."""
    s = settings_of(storage)
    if s is not None:
        os.environ[ENV] = json.dumps(s, sort_keys=True)
    return s


def active() -> dict | None:
    """The settings :func:`activate` set here or in a parent process; None when none."""
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else None


def credentials(s: dict) -> tuple[str, str]:
    """(access key, secret key) from the environment variables the settings name; a clear error
    naming the variable and the config key when one is unset."""
    out = []
    for key in ("access_key_env", "secret_key_env"):
        name = s[key]
        value = os.environ.get(name)
        if not value:
            raise ValueError(f"storage.{key}: the environment variable {name} is not set (it must hold the "
                             f"object store's {'access key' if key == 'access_key_env' else 'secret key'} "
                             f"for {s['endpoint']})")
        out.append(value)
    return out[0], out[1]


def pyarrow_options(s: dict) -> dict:
    """Keyword arguments of ``pyarrow.fs.S3FileSystem``."""
    key, secret = credentials(s)
    return {"access_key": key, "secret_key": secret, "endpoint_override": s["endpoint"], "region": s["region"],
            "force_virtual_addressing": not s["path_style"]}


def delta_options(s: dict) -> dict[str, str]:
    """delta-rs ``storage_options``. delta-rs needs a lock provider for safe concurrent commits on
    S3; with none, ``AWS_S3_ALLOW_UNSAFE_RENAME`` lets one writer at a time commit (as the
    offline backend does on S3: run one writer per table)."""
    key, secret = credentials(s)
    return {"AWS_ENDPOINT_URL": s["endpoint"], "AWS_REGION": s["region"], "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_ALLOW_HTTP": str(s["endpoint"].startswith("http://")).lower(),
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": str(not s["path_style"]).lower(),
            "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}


def hadoop_conf(s: dict, secrets: bool = True) -> dict[str, str]:
    """Spark settings (``spark.hadoop.fs.s3a.*``) for ``s3a://`` with these settings; the keys'
    values only when ``secrets`` (Spark's UI redacts them: its default redaction pattern covers
    ``secret`` and ``access.key``)."""
    conf = {"spark.hadoop.fs.s3a.endpoint": s["endpoint"], "spark.hadoop.fs.s3a.endpoint.region": s["region"],
            "spark.hadoop.fs.s3a.path.style.access": str(s["path_style"]).lower(),
            "spark.hadoop.fs.s3a.connection.ssl.enabled": str(s["endpoint"].startswith("https://")).lower()}
    if secrets:
        key, secret = credentials(s)
        conf.update({"spark.hadoop.fs.s3a.access.key": key, "spark.hadoop.fs.s3a.secret.key": secret,
                     "spark.hadoop.fs.s3a.aws.credentials.provider":
                         "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"})
    return conf


def storage_options(path: str) -> dict[str, str] | None:
    """delta-rs ``storage_options`` for ``path``: the active settings for an S3 URI, else None."""
    s = active()
    return delta_options(s) if s is not None and is_s3(path) and "@" not in str(path).split("/")[2] else None
