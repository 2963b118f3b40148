"""The run report as one self-contained HTML page (engine-free: plain data in, HTML out).

:func:`render_html` takes what :func:`dollyflow.report.gather.collect` gathers (or any dict of
the same shape) and embeds each plot (:mod:`dollyflow.core.plots`) as a base64 PNG, so the
page can be mailed, attached to a job run or opened from a Volume with nothing beside it.

Sections (``SECTIONS``): run, records per category, quarantine, duplicates, filter, token lengths,
training, inference, evaluation, tables. A run of the ``tiny`` preset (or the ``tiny-gpt-neox``
model) opens with a box saying its answers are not meaningful and which preset to use instead.

Long unbroken text (a generation of ``,.,.,.``, a path) wraps inside its cell: every cell,
paragraph and code span may break anywhere (``overflow-wrap:anywhere``), and generated text keeps
its line breaks (``white-space:pre-wrap``).
"""
from __future__ import annotations

import base64
import html
import json
import re
from datetime import datetime

from dollyflow.core.evaluation.bootstrap import MIN_CALL_ROWS, OVERALL
from dollyflow.core.evaluation.headline import LABELS, REFERENCE_METRICS
from dollyflow.core.models.build import is_tiny
from dollyflow.core.plots import (plot_categories, plot_category_loss, plot_counts, plot_differences, plot_headline,
                                  plot_lengths, plot_loss)

SECTIONS = [("run", "Run"), ("categories", "Records per category"), ("quarantine", "Quarantined lines"),
            ("duplicates", "Duplicates removed"), ("filter", "Filtered and redacted"), ("tokens", "Token lengths"), ("training", "Training"),
            ("inference", "Inference"), ("evaluation", "Evaluation"), ("tables", "Tables")]

TINY_PRESET, TINY_MODEL = "tiny", "tiny-gpt-neox"   # and tiny-llama, tiny-qwen2, tiny-mistral (is_tiny)
#: Presets for a real evaluation: conf/model/pythia-*.yaml (Dolly v2 fine-tuned pythia-2.8b, 6.9b, 12b).
GPU_PRESET = "pythia-1.4b"
TINY_WARNING = (
    "This run used the <code>tiny</code> preset: <code>tiny-gpt-neox</code>, a randomly initialised GPT-NeoX "
    "model of a few MB trained for seconds on CPU. Its answers are not meaningful, and neither are the "
    "evaluation's figures: this run shows the pipeline's mechanics, not answer quality. To evaluate a real fine-tune, run on a GPU with "
    "<code>dollyflow pipeline --preset " + GPU_PRESET + "</code> or larger (<code>pythia-2.8b</code>, "
    "<code>pythia-6.9b</code>, <code>pythia-12b</code>: the sizes Databricks fine-tuned as dolly-v2).")

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:.3em .6em;
vertical-align:top;text-align:left}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.6em 0}.muted{color:#777}.pre{white-space:pre-wrap;max-width:460px}
code{background:#f4f4f4;padding:0 .2em}.badge{display:inline-block;padding:0 .5em;border-radius:.6em;background:#e8f0fe}
table{max-width:100%}td,th,pre,code,p,li,h1{overflow-wrap:anywhere;word-break:break-word}
.gen{white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;min-width:12em}
.warn{border:2px solid #d93025;background:#fdecea;padding:.6em 1em;border-radius:.4em;margin:1em 0}
.good{color:#137333;font-weight:600}.bad{color:#c5221f;font-weight:600}.label{font-size:.85em;color:#555}
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
    if tiny_run(run):
        parts.append(f"<div class='warn' id='tiny-model'><b>Not a real model.</b> {TINY_WARNING}</div>")
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

    # filter: records removed per stage and reason, redactions per kind
    h2("filter")
    fl = d.get("filter") or {}
    if not fl.get("ran"):
        parts.append("<p class='muted'>the filter job did not run in this pipeline</p>")
    else:
        removed = fl.get("removed") or {}
        parts.append(f"<p>{_fmt(fl.get('rows_in'))} silver records: {_fmt(fl.get('rows_kept'))} kept in curated, "
                     f"{_fmt(fl.get('rows_removed'))} removed; {_fmt(fl.get('records_redacted'))} kept records "
                     "had personal data redacted.</p>")
        parts.append(_table(["stage", "reason", "records removed"],
                            [[stage, reason, _fmt(n)] for stage, reasons in sorted(removed.items())
                             for reason, n in sorted(reasons.items())] or [["-", "none", "0"]], num={2}))
        red = fl.get("redactions") or {}
        parts.append(_table(["redacted kind", "spans replaced"],
                            [[k, _fmt(v)] for k, v in sorted(red.items())] or [["none", "0"]], num={1}))
        if fl.get("examples"):
            parts.append(_table(["record", "stage / reason", "detail", "span"],
                                [[x["record_id"], f"{x['stage']} / {x['reason']}", _clip(x.get("detail"), 200),
                                  _clip(x.get("span"), 120)] for x in fl["examples"]]))

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

    # evaluation
    h2("evaluation")
    parts.extend(_evaluation(d.get("evaluate") or {}))

    # tables
    h2("tables")
    parts.append(_table(["table", "version", "operation", "written by", "at", "location"],
                        [[t["table"], _fmt(t.get("version")), t.get("operation"), t.get("written_by"),
                          t.get("timestamp"), t.get("location")] for t in d.get("tables", [])], num={1}))
    parts.append("<p class='muted'>Every plot above reads these versions (Delta time travel); "
                 "<code>dollyflow report --run-id " + _e(run.get("run_id")) + "</code> rebuilds this page.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def tiny_run(run: dict) -> bool:
    """Whether the run used the tiny preset or the tiny random model."""
    return run.get("preset") == TINY_PRESET or str(run.get("preset") or "").startswith(TINY_PRESET + "-") \
        or is_tiny(str(run.get("model") or ""))


# ---------------------------------------------------------------------------------------------
# the evaluation section

OWN = "each category's own"


def _iv(iv: dict | None, digits: int = 3) -> str:
    """``mean [low, high]`` of an interval dict."""
    if not iv or iv.get("mean") is None:
        return "-"
    lo, hi = iv.get("low"), iv.get("high")
    bounds = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None else ""
    return f"{iv['mean']:.{digits}f}{bounds}"


def _diff(c: dict | None, key: str) -> tuple[str, str]:
    """The difference cell and its verdict (which side is better, or no clear difference)."""
    if not c or c.get("diff") is None:
        return "-", ""
    b, a = (key.split(" - ") + [""])[:2]
    cell = f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" if c.get("low") is not None else f"{c['diff']:+.3f}"
    if c.get("significant"):
        better = b if c["diff"] > 0 else a
        return cell, f"<span class='{'good' if better == b else 'bad'}'>{_e(better)} better</span>"
    if (c.get("n") or 0) < MIN_CALL_ROWS:
        return cell, (f"<span class='muted'>too few records to call ({c.get('n') or 0} &lt; {MIN_CALL_ROWS}: "
                      "a bootstrap interval of so few rows is too narrow)</span>")
    return cell, "<span class='muted'>no clear difference (the interval holds 0)</span>"


def _markdown(text: str) -> str:
    """The headline note (:func:`dollyflow.core.evaluation.headline.explain`): paragraphs,
    ``- `` bullets and ``**bold**``, escaped."""
    out, items = [], []

    def inline(line: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", _e(line))

    def flush() -> None:
        if items:
            out.append("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        if line.startswith("- "):
            items.append(inline(line[2:]))
            continue
        flush()
        if line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "".join(out)


def _judge_rows(node, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every win-rate entry (a dict with ``win``, ``tie`` and ``loss``) in the judge's JSON, with
    the keys leading to it (side or comparison, category; ``by_category`` levels left out)."""
    if not isinstance(node, dict):
        return []
    if all(k in node for k in ("win", "tie", "loss")):
        return [(path, node)]
    rows = []
    for k, v in node.items():
        rows.extend(_judge_rows(v, path if k == "by_category" else (*path, str(k))))
    return rows


def _rate(x) -> str:
    if isinstance(x, dict):
        return _iv(x)
    return _fmt(x) if x is not None else "-"


def _evaluation(ev: dict) -> list[str]:
    if not ev.get("ran"):
        return [f"<p class='muted'>evaluation did not run in this pipeline run"
                f"{': ' + _e(ev['reason']) if ev.get('reason') else ''}</p>"]
    parts = []
    sides = ev.get("sides") or []
    labels = [s.get("label") for s in sides]
    headline = ev.get("headline") or {}
    reasons = ev.get("reasons") or {}
    finish = ev.get("finish_reasons") or {}
    left = [f"{_fmt(ev.get(k))} {what}" for k, what in (("not_in_every_model", "lacked a prediction of some model"),
                                                        ("not_in_silver", "were not in silver")) if ev.get(k)]
    parts.append(f"<p>{_fmt(ev.get('compared'))} records compared of the {_fmt(ev.get('records'))} the models "
                 f"predicted{' (' + ', '.join(left) + ')' if left else ''}, against silver v"
                 f"{_e(ev.get('silver_version'))}; {_fmt(ev.get('scored'))} rows scored in this run. Read from "
                 f"{_e(ev.get('source'))}.</p>")
    parts.append(_table(["side", "model", "model_sha", "generation parameters", "predictions", "finish reasons",
                         "not scored"],
                        [[s.get("label"), s.get("model"), (s.get("model_sha") or "")[:12], s.get("params"),
                          _fmt(s.get("rows")),
                          ", ".join(f"{k} {v}" for k, v in sorted((finish.get(s.get("label")) or {}).items())),
                          ", ".join(f"{k} {v}" for k, v in sorted((reasons.get(s.get("label")) or {}).items()))
                          or "none"] for s in sides], num={4}))
    if not headline:
        parts.append("<p class='muted'>the evaluation recorded no headline figures</p>")
        return parts

    cats = sorted(c for c in headline if c != OVERALL) + ([OVERALL] if OVERALL in headline else [])
    parts.append(_img(plot_headline(headline, labels), "headline metric per category and side, with intervals"))
    keys = [k for k in (ev.get("comparisons") or {})] or sorted({k for h in headline.values()
                                                                for k in (h.get("diff") or {})})
    for key in keys:
        parts.append(_img(plot_differences(headline, key), f"paired difference {key} per category"))

    # the headline table: each side's interval, each difference and whether its interval excludes 0
    head = ["category", "headline metric", "records"] + [f"{x}: mean [interval]" for x in labels]
    for key in keys:
        head += [f"{key} [interval]", "verdict"]
    rows = []
    for c in cats:
        h = headline[c]
        metric = h.get("metric", "")
        first = (h.get("sides") or {}).get(labels[0]) if labels else None
        cells = [f"<td>{_e(c or '(no category)')}</td>",
                 f"<td>{_e(OWN if c == OVERALL else LABELS.get(metric, metric))}</td>",
                 f"<td class='num'>{_fmt((first or {}).get('n'))}</td>"]
        cells += [f"<td class='num'>{_e(_iv((h.get('sides') or {}).get(x)))}</td>" for x in labels]
        for key in keys:
            cell, verdict = _diff((h.get("diff") or {}).get(key), key)
            cells += [f"<td class='num'>{_e(cell)}</td>", f"<td>{verdict}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("<table><tr>" + "".join(f"<th>{_e(x)}</th>" for x in head) + "</tr>" + "".join(rows) + "</table>")
    parts.append("<p class='muted'>Intervals: " + _e(f"{(ev.get('parameters') or {}).get('level', 0.95):.0%}")
                 + " percentile bootstrap of the mean (" + _e((ev.get("parameters") or {}).get("resamples"))
                 + " resamples, seed " + _e((ev.get("parameters") or {}).get("seed")) + "); a difference is the "
                 "paired bootstrap over the same records, and is called only when its interval excludes 0 "
                 f"and it rests on at least {MIN_CALL_ROWS} records.</p>")
    if ev.get("headline_note"):
        parts.append(f"<div class='note'>{_markdown(ev['headline_note'])}</div>")

    judge = _judge_rows(ev.get("judge"))
    if judge:
        parts.append("<h3>Judge</h3>")
        parts.append(_table(["comparison / category", "wins", "ties", "losses", "score (wins + ½ ties)", "judged",
                             "unparseable"],
                            [[" / ".join(p) or OVERALL, _rate(r.get("win")), _rate(r.get("tie")), _rate(r.get("loss")),
                              _rate(r.get("score")), _fmt(r.get("n")), _fmt(r.get("unparseable"))]
                             for p, r in judge], num={1, 2, 3, 4, 5, 6}))

    # every reference metric per category, the sides side by side
    agg = ev.get("aggregates") or {}
    metrics = [m for m in REFERENCE_METRICS if all(m in (agg.get(x) or {}) for x in labels)]
    if metrics and labels:
        parts.append("<details><summary>Every reference metric per category (mean"
                     + (" per side: " + " / ".join(_e(x) for x in labels) if len(labels) > 1 else "") + ")</summary>")
        body = []
        for c in cats:
            vals = []
            for m in metrics:
                means = []
                for x in labels:
                    d = agg[x][m]
                    iv = d.get(OVERALL) if c == OVERALL else (d.get("by_category") or {}).get(c)
                    means.append(_fmt3((iv or {}).get("mean")))
                vals.append(" / ".join(means))
            body.append([c or "(no category)", *vals])
        parts.append(_table(["category", *[LABELS.get(m, m) for m in metrics]], body,
                            num=set(range(1, len(metrics) + 1))))
        parts.append("</details>")

    # best and worst examples per category, every side beside the reference
    examples = ev.get("examples") or []
    last = labels[-1] if labels else ""
    parts.append(f"<h3>Best and worst answers per category</h3><p>Per category, the record where side "
                 f"{_e(last)} scores highest and lowest on the category's headline metric, every side's answer "
                 f"beside the reference. Texts are cut at {_fmt(ev.get('clip'))} characters (…).</p>")
    if ev.get("examples_note"):
        parts.append(f"<p class='muted'>{_e(ev['examples_note'])}</p>")
    if examples:
        head = ["category", "instruction", "reference"] + [f"{x}" for x in labels]
        rows = []
        for x in examples:
            task = _e(x.get("instruction"))
            if x.get("context"):
                task += f"<div class='label'>context:</div>{_e(x['context'])}"
            cells = [f"<td>{_e(x['category'] or '(no category)')}<div class='label'>{_e(x['kind'])} · "
                     f"{_e(LABELS.get(x['metric'], x['metric']))} {_fmt3(x.get('value'))}</div>"
                     f"<div class='label'>{_e(x['record_id'])}</div></td>",
                     f"<td class='gen'>{task}</td>", f"<td class='gen'>{_e(x.get('reference'))}</td>"]
            for p in x.get("predictions") or []:
                text = _e(p.get("response")) if p.get("found") else "<span class='muted'>(prediction not found)</span>"
                note = f"{LABELS.get(x['metric'], x['metric'])} {_fmt3(p.get('value'))} · finish {p.get('finish_reason')}"
                if p.get("reason"):
                    note += f" · {p['reason']}"
                cells.append(f"<td class='gen'>{text}<div class='label'>{_e(note)}</div></td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(rows)
                     + "</table>")

    ml = ev.get("mlflow")
    if ml:
        parts.append("<p>MLflow: " + "; ".join(
            f"run <code>{_e(r.get('run_id'))}</code> ({_e(r.get('tracking_uri'))}): {_e(r.get('status'))}"
            + (f", {_fmt(r.get('metrics'))} metrics" if r.get("metrics") else "")
            + (f" ({_e(r.get('error'))})" if r.get("error") else "") for r in ml.get("runs", [])) + "</p>")
    elif ev.get("mlflow_skipped"):
        parts.append(f"<p class='muted'>MLflow: {_e(ev['mlflow_skipped'])}</p>")
    return parts


def _fmt3(x) -> str:
    return "-" if x is None else f"{x:.3f}"
