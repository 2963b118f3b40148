"""The engine-free half of ``dollyflow trace``: what the user typed, the spellings of a path as
ingest recorded it, line ranges, finding a record in a shard directory, and the trace's text.

A record trace (:func:`render_record`) and a model trace (:func:`render_model`) are plain dicts,
assembled from the tables by :mod:`dollyflow.engine.trace`; ``--json`` prints them as they are.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import unquote, urlsplit

import pyarrow.parquet as pq

from dollyflow.core.shards.manifest import read_manifest
from dollyflow.core.storage import exists, filesystem, is_uri, join

RECORD_ID = re.compile(r"[0-9a-f]{32}")
#: How much of a text (a response, a raw line) a text trace shows.
SHOWN_CHARS = 160


class TraceError(ValueError):
    """What was asked cannot be traced (an unknown record id, a line ingest never saw, a model
    directory without provenance); the message says why. The command exits with status 2."""


@dataclass(frozen=True)
class Target:
    """What to trace: a record id, or a line of an input file as it was given to ingest."""
    record_id: str | None = None
    file: str | None = None
    line: int | None = None

    @property
    def text(self) -> str:
        return self.record_id or f"{self.file}:{self.line}"


def parse_target(text: str) -> Target:
    """``<record_id>`` (32 hex digits) or ``<source_file>:<line>`` (the line counted from 1, as
    in quarantine and bronze; a Parquet or CSV row number likewise)."""
    text = (text or "").strip()
    if RECORD_ID.fullmatch(text.lower()):
        return Target(record_id=text.lower())
    m = re.fullmatch(r"(.+):(\d+)", text)
    if m and m.group(1) and int(m.group(2)) >= 1:
        return Target(file=m.group(1), line=int(m.group(2)))
    raise TraceError(f"cannot trace {text!r}: give a record id (32 hex digits, as in bronze.record_id) or "
                     "<source_file>:<line> (the file as given to ingest, its line counted from 1)")


def source_spellings(path: str) -> list[str]:
    """The ways ingest may have recorded ``path`` in ``source_file``: a local path is stored
    absolute, a ``file://`` input as ``file://<absolute path>``; a relative path is taken from the
    working directory. Object-store URIs are kept as given (plus their s3a/s3n twin)."""
    path = str(path)
    if path.startswith("file:"):
        local = unquote(urlsplit(path).path) or path[len("file:"):]
    elif is_uri(path):
        out = [path]
        for a, b in (("s3a://", "s3://"), ("s3n://", "s3://"), ("s3://", "s3a://")):
            if path.startswith(a):
                out.append(b + path[len(a):])
        return list(dict.fromkeys(out))
    else:
        local = os.path.expanduser(path)
    local = os.path.abspath(local)
    return [local, f"file://{local}"]


def line_ranges(lines: Iterable[int]) -> list[list[int]]:
    """Sorted, distinct line numbers as ``[first, last]`` ranges of consecutive lines."""
    out: list[list[int]] = []
    for n in sorted(set(int(x) for x in lines)):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def format_ranges(ranges: list[list[int]]) -> str:
    """``[[1, 3], [5, 5]]`` -> ``1-3, 5``."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def shard_file_of(shard_dir: str, record_id: str, split: str | None = None) -> str | None:
    """The shard file of ``shard_dir`` (its manifest's list, of ``split`` when given) that holds
    ``record_id``, reading only the ``record_id`` column; None when none does. Raises
    FileNotFoundError when the directory (or its manifest) is gone (pruned)."""
    manifest = read_manifest(shard_dir)
    for name, sp in sorted(manifest.get("splits", {}).items()):
        if split is not None and name != split:
            continue
        for s in sp.get("shards", []):
            fs, path = filesystem(join(shard_dir, s["file"]))
            with fs.open_input_file(path) as f:
                ids = pq.read_table(f, columns=["record_id"]).column("record_id")
            if record_id in set(ids.to_pylist()):
                return s["file"]
    return None


def shard_dir_exists(shard_dir: str | None) -> bool:
    return bool(shard_dir) and exists(join(shard_dir, "manifest.json"))


# ---------------------------------------------------------------------------------------------
# text


def _short(text, limit: int = SHOWN_CHARS) -> str:
    s = "" if text is None else str(text).replace("\n", "\\n")
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


def _sim(x) -> str:
    return "?" if x is None else f"{float(x):.3f}"


def _where(d: dict | None) -> str:
    return f"{d['source_file']}:{d['source_line']}" if d else "?"


def render_record(t: dict) -> str:
    """The human-readable form of a record trace (see :func:`dollyflow.engine.trace.trace_record`)."""
    out = [f"trace of {t['query']}" + (f" -> record {t['record_id']}" if t.get("record_id") else "")]
    raw = t.get("raw")
    if raw:
        out.append(f"  raw line     {_where(raw)} (ingest run {raw['ingest_run_id']}, {raw.get('ingested_at')})")
    for q in t.get("quarantine", []):
        out.append(f"  quarantined  {_where(q)}: {q['reason']}" + (f" ({q['detail']})" if q.get("detail") else "")
                   + f" (ingest run {q['ingest_run_id']})")
        out.append(f"               raw: {_short(q.get('raw'))}")
    if t.get("repeat_of"):
        r = t["repeat_of"]
        out.append(f"  repeat       {t['query']} holds the same record as {_where(r)} (ingest keeps a record's "
                   "first line; this one was counted as existing, not stored)")
    if not t.get("record_id"):
        return "\n".join(out)
    d = t["dedupe"]
    if d["status"] == "duplicate":
        out.append(f"  dedupe       removed: {d['kind']} duplicate of {d['duplicate_of']} (similarity "
                   f"{_sim(d['similarity'])}" + (f", its line {_where(d.get('survivor_source'))}" if d.get(
                       "survivor_source") else "") + f"); dedupe run {d.get('dedupe_run_id')}")
        out.append(f"               the survivor's trace: dollyflow trace {d['duplicate_of']}")
    elif d["status"] == "survivor":
        dup = d.get("duplicates", [])
        out.append(f"  dedupe       kept in silver v{d.get('silver_version')} (dedupe run {d.get('dedupe_run_id')})"
                   + (f"; survivor of {len(dup)} duplicate(s): " + ", ".join(
                       f"{x['record_id']} ({x['kind']}, {_sim(x['similarity'])})" for x in dup[:5])
                      + (" ..." if len(dup) > 5 else "") if dup else ""))
    else:
        out.append(f"  dedupe       {d['status']}")
    f = t["filter"]
    if f["status"] == "removed":
        for r in f["removed"]:
            out.append(f"  filter       removed at stage {r['stage']}: {r['reason']}"
                       + (f" ({_short(r['detail'], 80)})" if r.get("detail") else "")
                       + (f", span \"{_short(r['span'], 60)}\"" if r.get("span") else "")
                       + f" (filter run {r.get('filter_run_id')})")
    elif f["status"] == "redacted":
        out.append(f"  filter       kept, redacted: {_short(json.dumps(f['redactions'], ensure_ascii=False), 200)} "
                   f"(filter run {f.get('filter_run_id')})")
    elif f["status"] == "kept":
        out.append(f"  filter       kept unchanged (filter run {f.get('filter_run_id')})")
    else:
        out.append(f"  filter       {f['status']}")
    k = t["tokenize"]
    if k["status"] == "tokenized":
        out.append(f"  tokenize     split {k['split']}, shard {k.get('shard_file') or k.get('shard_note', '?')} "
                   f"in {k.get('shard_dir')} (tokenize run {k.get('tokenize_run_id')}, tokenized v"
                   f"{k.get('tokenized_version')})")
    else:
        out.append(f"  tokenize     {k['status']}")
    models = t.get("models", [])
    if not models:
        out.append("  models       none trained on shards that hold it")
    for m in models:
        present = "" if m.get("model_present") else " (the directory no longer holds this model)"
        out.append(f"  model        {m['model_dir']}{present}: {m['split']} split of {m.get('shard_dir')}, "
                   f"train run {m.get('train_run_id')}, MLflow run {m.get('mlflow_run_id') or '-'}")
    preds = t.get("predictions", [])
    if not preds:
        out.append("  predictions  none")
    for p in preds:
        out.append(f"  prediction   {p['model']} (model_sha {str(p['model_sha'])[:12]}, params_sha {p['params_sha']}), "
                   f"infer run {p['run_id']}, finish {p.get('finish_reason')}: \"{_short(p.get('response'), 80)}\"")
    evals = t.get("evaluations", [])
    if not evals:
        out.append("  evaluation   none")
    for e in evals:
        scores = ", ".join(f"{k} {e['metrics'][k]:.3f}" for k in ("rougeL", "token_f1")
                           if e.get("metrics", {}).get(k) is not None)
        out.append(f"  evaluation   {e['model']} (params_sha {e['params_sha']}, silver v{e['silver_version']}), "
                   f"evaluate run {e['run_id']}: {scores or e.get('reason') or '-'}"
                   + (f", judge {e['judge_verdict']}" if e.get("judge_verdict") else ""))
    return "\n".join(out)


def _file_line(f: dict) -> str:
    one = f["lines"] == 1
    return f"    {f['source_file']}: line{'' if one else 's'} {format_ranges(f['ranges'])} ({f['lines']} line{'' if one else 's'})"


def render_model(t: dict) -> str:
    """The human-readable form of a model trace (:func:`dollyflow.engine.trace.trace_model`)."""
    out = [f"model {t['model_dir']}: trained by run {t.get('train_run_id')} (MLflow run "
           f"{t.get('mlflow_run_id') or '-'}) on {t['source']['table']} v{t['source']['version']} through "
           f"tokenized v{t['tokenized_version']} ({t.get('shard_dir')})"]
    for split, label in (("train", "trained on"), ("test", "held out (eval loss)")):
        s = t["splits"].get(split)
        if not s:
            continue
        out.append(f"  {label}: {s['records']} records from {len(s['files'])} file(s)")
        for f in s["files"]:
            out.append(_file_line(f))
        if s.get("unlocated"):
            out.append(f"    {s['unlocated']} record(s) not found in {t['source']['table']} "
                       f"v{t['source']['version']}")
    dup = t.get("duplicates")
    if dup and dup["records"]:
        out.append(f"  near copies of trained records, removed by dedupe (their content reached the model through "
                   f"the survivor): {dup['records']}")
        for f in dup["files"]:
            out.append(_file_line(f))
    return "\n".join(out)
