"""Short human summaries of the jobs' machine-readable summaries, and the tables each job writes.

``dollyflow pipeline`` prints one line per job from these (``--json`` prints the summaries
themselves); :mod:`dollyflow.report` reuses them in the run report.
"""
from __future__ import annotations

# The data tables each job writes; run-log tables (ingest_runs, ...) get a row every run and are
# not counted as a change.
JOB_TABLES = {
    "ingest": ["bronze", "quarantine"],
    "dedupe": ["silver", "duplicates"],
    "filter": ["curated", "filtered"],
    "tokenize": ["tokenized"],
    "train": [],
    "infer": ["predictions"],
    "evaluate": ["eval_records"],
}
ALL_TABLES = ["bronze", "quarantine", "ingest_runs", "silver", "duplicates", "dedupe_runs", "curated", "filtered",
              "filter_runs", "tokenized",
              "tokenize_runs", "train_runs", "predictions", "eval_records", "eval_runs"]


def _n(x) -> str:
    if x is None:
        return "?"
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:,}"


def _reasons(d: dict | None) -> str:
    d = {k: v for k, v in (d or {}).items() if v}
    return ", ".join(f"{k} {_n(v)}" for k, v in sorted(d.items())) if d else "none"


def _harness(h: dict | None) -> str:
    """``; harness dolly_mc acc A 0.6, B 0.8`` (each task's first metric per side) or ``""``."""
    scores = (h or {}).get("scores") or {}
    parts = []
    for task in sorted({t for tasks in scores.values() for t in tasks}):
        metric = next((m for label in scores for m in scores[label].get(task, {})
                       if m != "samples" and not m.endswith("_stderr")), None)
        if metric:
            parts.append(f"{task} {metric} " + ", ".join(f"{label} {_n(tasks.get(task, {}).get(metric))}"
                                                         for label, tasks in scores.items()))
    return f"; harness {'; '.join(parts)}" if parts else ""


def _versions(changes: dict) -> str:
    """``bronze v0->v1, quarantine v0`` from {table: [before, after]}."""
    out = []
    for name, (before, after) in changes.items():
        if after is None:
            continue
        out.append(f"{name} v{after}" if before == after else
                   f"{name} {'new' if before is None else f'v{before}'}->v{after}")
    return ", ".join(out)


def _interval(iv: dict | None) -> str:
    """``0.412 [0.38, 0.45]`` from a summary's interval."""
    iv = iv or {}
    return f"{_n(iv.get('mean'))} [{_n(iv.get('low'))}, {_n(iv.get('high'))}]"


def job_status(name: str, summary: dict, changes: dict) -> str:
    """``unchanged`` when the job wrote no new version of its data tables (and, for train,
    trained nothing; for tokenize, wrote no new shard directory), else ``changed``."""
    if summary.get("skipped") is True:
        return "unchanged"
    if name == "train":
        return "changed"
    if name == "tokenize":   # a new shard directory is a change even when the table reads the same
        return "changed"
    if any(before != after for before, after in changes.values()):
        return "changed"
    return "unchanged"


def human_line(name: str, s: dict, changes: dict | None = None) -> str:
    """One line (maybe two) a person reads: records in/out, drops by reason, loss, tokens/s,
    table versions."""
    changes = changes or {}
    v = _versions(changes)
    tail = f" | {v}" if v else ""
    if "skipped" in s and isinstance(s["skipped"], str):   # not run (e.g. infer without a model)
        return f"skipped: {s['skipped']}"
    if name == "ingest":
        return (f"{_n(s.get('lines_read'))} lines from {_n(s.get('files'))} file(s) -> {_n(s.get('rows_new'))} new, "
                f"{_n(s.get('rows_existing'))} already in bronze or repeated, {_n(s.get('rows_quarantined'))} "
                f"quarantined ({_reasons(s.get('quarantined_by_reason'))}){tail}")
    if name == "dedupe":
        pre = "same bronze version and parameters as the last run: nothing to do; " if s.get("skipped") else ""
        return (f"{pre}{_n(s.get('input_rows'))} records -> {_n(s.get('survivors'))} kept, removed "
                f"{_n(s.get('removed_exact'))} exact + {_n(s.get('removed_near'))} near duplicates in "
                f"{_n(s.get('clusters'))} clusters{tail}")
    if name == "filter":
        pre = "same silver version and settings as the last run: nothing to do; " if s.get("skipped") else ""
        removed = {f"{stage}/{reason}": n for stage, reasons in (s.get("removed") or {}).items()
                   for reason, n in reasons.items()}
        return (f"{pre}{_n(s.get('rows_in'))} records -> {_n(s.get('rows_kept'))} kept, {_n(s.get('rows_removed'))} "
                f"removed ({_reasons(removed)}); redacted {_reasons(s.get('redactions'))}{tail}")
    if name == "tokenize":
        rec, tok = s.get("records") or {}, s.get("tokens") or {}
        splits = ", ".join(f"{k} {_n(rec[k])} records / {_n(tok.get(k))} tokens" for k in sorted(rec))
        pre = "shards already built from this silver version: nothing to do; " if s.get("skipped") else ""
        line = (f"{pre}{_n(s.get('records_in'))} records -> {splits or '?'}; dropped: {_reasons(s.get('drops'))} "
                f"(max_length {_n(s.get('max_length'))}){tail}")
        if s.get("shards_current") is False:     # the pointer names newer shards: say so
            line += f"\n    NOT the current shards: {s.get('not_current')}"
        return line
    if name == "train":
        if s.get("skipped"):
            return (f"{s.get('output_dir')} already holds this model (same shards and config): nothing to do; "
                    f"eval loss {_n(s.get('eval_loss'))}")
        return (f"{_n(s.get('steps'))} steps, loss {_n(s.get('train_loss_first'))} -> {_n(s.get('train_loss'))}, "
                f"eval loss {_n(s.get('eval_loss'))}, {_n(s.get('tokens_per_s'))} tokens/s "
                f"({_n(s.get('useful_tokens_per_s'))} on response tokens) | model {s.get('output_dir')}"
                + (f" | MLflow run {s['mlflow_run_id']}" if s.get("mlflow_run_id") else ""))
    if name == "infer":
        inp = s.get("input") or {}
        where = f"{inp.get('table')} ({inp.get('split')} split)" if inp.get("table") else "the query"
        return (f"{_n(s.get('rows_in'))} rows of {where}: {_n(s.get('generated'))} generated, "
                f"{_n(s.get('already_predicted'))} already predicted; finish {_reasons(s.get('finish_reasons'))}; "
                f"{_n(s.get('completion_tokens'))} tokens at {_n(s.get('tokens_per_second'))} tokens/s"
                + (f" ({s['engine']} {s.get('compute_type')})" if s.get("engine") not in (None, "torch") else "")
                + (f" (model loads: {_n(w['loads'])}, slowest {w['load_seconds']:.1f} s)"
                   if (w := s.get("workers") or {}).get("loads") else "") + tail)
    if name == "evaluate":
        sides = s.get("sides") or []
        overall = (s.get("headline") or {}).get("overall") or {}
        figures = " vs ".join(f"{label} {_interval(iv)}" for label, iv in (overall.get("sides") or {}).items())
        diffs = "; ".join(f"{k} {_n((c or {}).get('diff'))} [{_n((c or {}).get('low'))}, {_n((c or {}).get('high'))}]"
                          for k, c in (overall.get("diff") or {}).items())
        names = ", ".join(f"{x.get('label')} = {x.get('model')} params {x.get('params_sha')}" for x in sides)
        judge = s.get("judge") or {}
        verdicts = "; ".join(
            f"judge {label} vs {judge.get('baseline') or 'reference'}: "
            + (f"win {_n(r['overall']['win']['mean'])}, tie {_n(r['overall']['tie']['mean'])}, "
               f"loss {_n(r['overall']['loss']['mean'])}, score {_interval(r['overall']['score'])} "
               f"over {_n(r['overall']['n'])} rows" if r["overall"]["n"] else "no parseable verdict")
            + (f", {_n(r['overall']['unparseable'])} unparseable" if r["overall"]["unparseable"] else "")
            for label, r in (judge.get("rates") or {}).items())
        return (f"{_n(s.get('compared'))} records x {len(sides)} model(s) ({names}): {_n(s.get('scored'))} scored, "
                f"{_n(sum((s.get('unscored_rows') or {}).values()))} without a reference; headline {figures}"
                + (f"; difference {diffs}" if diffs else "") + (f"; {verdicts}" if verdicts else "")
                + _harness(s.get("harness"))
                + "".join(f"; MLflow run {r.get('run_id')} {r.get('status')}" for r in (s.get("mlflow") or {}).get("runs", []))
                + tail)
    return tail.lstrip(" |")
