"""The run report as one self-contained HTML page (engine-free: plain data in, HTML out).

:func:`render_html` takes what :func:`dollyflow.report.gather.collect` gathers (or any dict of
the same shape) and embeds each plot (:mod:`dollyflow.core.plots`) as a base64 PNG, so the
page can be mailed, attached to a job run or opened from a Volume with nothing beside it.

Sections (``SECTIONS``): run, records per category, quarantine, duplicates, token lengths,
training, inference, tables.
"""
from __future__ import annotations

import base64
import html
import json
from datetime import datetime

from dollyflow.core.plots import plot_categories, plot_category_loss, plot_counts, plot_lengths, plot_loss

SECTIONS = [("run", "Run"), ("categories", "Records per category"), ("quarantine", "Quarantined lines"),
            ("duplicates", "Duplicates removed"), ("tokens", "Token lengths"), ("training", "Training"),
            ("inference", "Inference"), ("tables", "Tables")]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:.3em .6em;
vertical-align:top;text-align:left}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.6em 0}.muted{color:#777}.pre{white-space:pre-wrap;max-width:460px}
code{background:#f4f4f4;padding:0 .2em}.badge{display:inline-block;padding:0 .5em;border-radius:.6em;background:#e8f0fe}
"""


# ---------------------------------------------------------------------------------------------
# HTML

def _e(x) -> str:
    if isinstance(x, datetime):
        x = x.isoformat(timespec="seconds")
    return html.escape("" if x is None else str(x))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(headers: list[str], rows: list[list], num: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i in num else "pre"}">{_e(v)}</td>'
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _clip(text, n: int = 300) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[:n] + " ..."


def render_html(d: dict) -> str:
    run = d.get("run", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dollyflow run {_e(run.get('run_id'))}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>dollyflow pipeline run <code>{_e(run.get('run_id'))}</code></h1>"]
    sec = dict(SECTIONS)

    def h2(key: str) -> None:
        parts.append(f'<h2 id="{key}">{_e(sec[key])}</h2>')

    # run
    h2("run")
    jobs = d.get("jobs", {})
    parts.append(f"<p>{_e(run.get('status'))} · started {_e(run.get('started_at'))} · finished "
                 f"{_e(run.get('finished_at'))} · {_fmt(run.get('seconds'))} s · preset {_e(run.get('preset'))}, "
                 f"env {_e(run.get('env'))}"
                 + (" · <span class='badge'>unchanged: no job wrote a new data table version</span>"
                    if run.get("unchanged") else "") + "</p>")
    parts.append(_table(["job", "status", "seconds"], [[n, j.get("status"), _fmt(j.get("seconds"))]
                                                       for n, j in jobs.items()], num={2}))

    # categories
    h2("categories")
    cats = d.get("categories") or {}
    if cats:
        parts.append(_img(plot_categories(cats), "records per category"))
        parts.append(_table(["category", "bronze", "silver"],
                            [[c, _fmt(v.get("bronze", 0)), _fmt(v.get("silver", 0))] for c, v in sorted(cats.items())]
                            + [["total", _fmt(sum(v.get("bronze", 0) for v in cats.values())),
                                _fmt(sum(v.get("silver", 0) for v in cats.values()))]], num={1, 2}))
    else:
        parts.append("<p class='muted'>no records</p>")

    # quarantine
    h2("quarantine")
    q = d.get("quarantine") or {}
    if q:
        parts.append(_img(plot_counts(q, "Quarantined lines per reason", "lines"), "quarantined lines per reason"))
        parts.append(_table(["reason", "line", "detail"], [[x["reason"], x["where"], _clip(x["detail"], 160)]
                                                          for x in d.get("quarantine_examples", [])]))
    else:
        parts.append("<p>No line was quarantined: every input line parsed into a valid record.</p>")

    # duplicates
    h2("duplicates")
    dup = d.get("duplicates") or {}
    if dup:
        parts.append(_img(plot_counts(dup, "Duplicates removed per kind", "records removed"), "duplicates per kind"))
        parts.append(_table(["kind", "similarity", "removed record", "kept (survivor)"],
                            [[x["kind"], f"{x['similarity']:.3f}",
                              f"{x['record_id']}\n{_clip(x['instruction'], 160)}\n→ {_clip(x['response'], 160)}",
                              f"{x['survivor_id']}\n{_clip(x['survivor_instruction'], 160)}\n→ "
                              f"{_clip(x['survivor_response'], 160)}"] for x in d.get("duplicate_examples", [])]))
    else:
        parts.append("<p>No duplicates: every record of bronze survived into silver.</p>")

    # tokens
    h2("tokens")
    tk = d.get("tokens") or {}
    if tk.get("splits"):
        parts.append(_img(plot_lengths(tk), "token length histogram per split"))
    drops = tk.get("drops") or {}
    parts.append(_table(["split", "records", "tokens"],
                        [[s, _fmt(v.get("records")), _fmt(v.get("tokens"))] for s, v in sorted(tk.get("splits", {}).items())],
                        num={1, 2}))
    parts.append(f"<p>Dropped (never truncated), max_length {_e(tk.get('max_length'))}: "
                 + (", ".join(f"{_e(k)} {_fmt(v)}" for k, v in sorted(drops.items())) or "none")
                 + f". Shards: <code>{_e(tk.get('shard_dir'))}</code> (manifest sha256 "
                   f"<code>{_e((tk.get('manifest_sha256') or '')[:16])}</code>).</p>")

    # training
    h2("training")
    tr = d.get("train") or {}
    metrics = tr.get("metrics") or []
    if metrics:
        parts.append(_img(plot_loss(metrics), "training and eval loss"))
        evals = [m for m in metrics if m.get("kind") == "eval" and m.get("eval_loss_per_category")]
        if evals:
            parts.append(_img(plot_category_loss(evals[-1]["eval_loss_per_category"]), "eval loss per category"))
    else:
        parts.append("<p class='muted'>no training metrics recorded</p>")
    ml = tr.get("mlflow") or {}
    parts.append(_table(["", ""], [
        ["model", tr.get("output_dir")], ["decision", tr.get("decision")],
        ["method / launcher / ranks", f"{tr.get('method')} / {tr.get('launcher')} / {tr.get('processes')}"],
        ["steps", _fmt(tr.get("steps"))], ["final train loss", _fmt(tr.get("train_loss"))],
        ["final eval loss", _fmt(tr.get("eval_loss"))],
        ["tokens/s (all / response)", f"{_fmt(tr.get('tokens_per_s'))} / {_fmt(tr.get('useful_tokens_per_s'))}"],
        ["MLflow run", f"{ml.get('run_id')} (experiment {ml.get('experiment')}, tracking {ml.get('tracking_uri')})"
         if ml else "not tracked"]]))

    # inference
    h2("inference")
    inf = d.get("infer") or {}
    fr = inf.get("finish_reasons") or {}
    if inf.get("model"):
        parts.append(_table(["", ""], [
            ["model", inf.get("model")], ["rows in / generated / already predicted",
                                          f"{_fmt(inf.get('rows_in'))} / {_fmt(inf.get('generated'))} / "
                                          f"{_fmt(inf.get('already_predicted'))}"],
            ["throughput", f"{_fmt(inf.get('completion_tokens'))} tokens in {_fmt(inf.get('generation_seconds'))} s "
                           f"= {_fmt(inf.get('tokens_per_second'))} tokens/s"],
            ["parameters", json.dumps(inf.get("params"), sort_keys=True)]]))
        if fr:
            parts.append(_img(plot_counts(fr, "finish_reason of the predictions", "rows"), "finish reasons"))
        parts.append(_table(["record", "instruction", "reference response", "generated response", "finish"],
                            [[f"{s['record_id']}\n{s['category']}", _clip(s["instruction"], 200),
                              _clip(s["reference"]), _clip(s["response"]),
                              f"{s['finish_reason']} ({s['completion_tokens']} tokens)"]
                             for s in inf.get("samples", [])]))
    else:
        parts.append("<p class='muted'>inference did not run in this pipeline run</p>")

    # tables
    h2("tables")
    parts.append(_table(["table", "version", "operation", "written by", "at", "location"],
                        [[t["table"], _fmt(t.get("version")), t.get("operation"), t.get("written_by"),
                          t.get("timestamp"), t.get("location")] for t in d.get("tables", [])], num={1}))
    parts.append("<p class='muted'>Every plot above reads these versions (Delta time travel); "
                 "<code>dollyflow report --run-id " + _e(run.get("run_id")) + "</code> rebuilds this page.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
