"""Run records: ``<files root>/pipeline_runs/<run id>/run.json`` (what a pipeline run produced),
where a run's report goes, and the JSON form every summary and record is printed in.

Each record holds the config, every job's summary and status, the Delta version of every table
after the run, the shard directory, the model and the MLflow run; ``dollyflow report --run-id``
rebuilds a run's report from it. Records and printed summaries are redacted: no Spark conf value,
URI user info or secret query value is written.
"""
from __future__ import annotations

import json
from datetime import date, datetime

from dollyflow.config import redact
from dollyflow.core.storage import exists, list_dir, read_bytes, write_atomic

RUNS_DIR = "pipeline_runs"
REPORTS_DIR = "reports"


def json_default(o):
    """``json.dumps(default=...)`` for summaries: dates as ISO strings, anything else as str."""
    if isinstance(o, (datetime, date)):
        return o.isoformat()
    return str(o)


def to_json(obj, indent: int | None = 2) -> str:
    """``obj`` redacted, as the JSON a job or the pipeline prints and records."""
    return json.dumps(redact(obj), indent=indent, default=json_default)


def runs_root(files_root: str) -> str:
    return f"{files_root.rstrip('/')}/{RUNS_DIR}"


def run_dir(files_root: str, run_id: str) -> str:
    return f"{runs_root(files_root)}/{run_id}"


def report_path(files_root: str, run_id: str) -> str:
    return f"{files_root.rstrip('/')}/{REPORTS_DIR}/{run_id}.html"


def save_run(record: dict) -> str:
    """Write the run record, redacted."""
    path = f"{run_dir(record['files_root'], record['run_id'])}/run.json"
    write_atomic(path, to_json(record).encode("utf-8"))
    return path


def load_run(files_root: str, run_id: str | None = None) -> dict:
    """The record of pipeline run ``run_id``, or of the newest complete run."""
    root = runs_root(files_root)
    if run_id is None:
        names = [n for n, is_dir in list_dir(root) if is_dir and exists(f"{root}/{n}/run.json")]
        if not names:
            raise FileNotFoundError(f"no pipeline run recorded under {root}: run `dollyflow pipeline` first")
        runs = [json.loads(read_bytes(f"{root}/{n}/run.json")) for n in names]
        return max(runs, key=lambda r: r.get("started_at", ""))
    path = f"{root}/{run_id}/run.json"
    if not exists(path):
        known = ", ".join(n for n, d in list_dir(root) if d) or "none"
        raise FileNotFoundError(f"no pipeline run {run_id!r} under {root} (recorded runs: {known})")
    return json.loads(read_bytes(path))
