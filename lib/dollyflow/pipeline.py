"""``dollyflow pipeline`` and ``dollyflow report``: every job in order on one Spark session, a
record of what the run produced, and the run report.

    dollyflow pipeline --preset tiny ingest.input=data.jsonl      # one line per job, then the report
    dollyflow pipeline --json ...                                  # one JSON document on stdout
    dollyflow report [--run-id ID]                                 # rebuild a run's report

Per job a person sees one progress line and a short summary (:mod:`dollyflow.summaries`);
the job's own output (training steps, warnings) goes to ``<files root>/pipeline_runs/<run
id>/<job>.log`` (``--verbose`` streams it instead). The train job's model feeds infer unless
``infer.model`` is set; infer scores the test split into ``predictions``.

The run stops at the first job that fails: its line says ``FAILED`` with the error, the last
lines name the job, its error and the jobs that did not run, the exit code is 1, and the run
record has ``status: failed``, ``failed_job`` and ``not_run`` (a job that committed rows before
failing, such as ingest on an input with no valid record, leaves its summary there too).

Each run writes ``<files root>/pipeline_runs/<run id>/run.json``: the config, every job's summary
and status (``changed`` / ``unchanged``: whether it wrote a new version of its data tables),
the Delta version of every table after the run, the shard directory, the model and MLflow run.
The report (``<files root>/reports/<run id>.html``) is built from those versions (Delta time
travel), the shard manifest and the training metrics, so ``dollyflow report --run-id`` rebuilds
an earlier run's report exactly, whatever happened to the tables since.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from dollyflow.config import ConfigError, load_config, redact_uri
from dollyflow.core.shards import read_manifest
from dollyflow.core.storage import absolute, is_uri, write_bytes
from dollyflow.core.training.base import base_dir_for, write_base_model
from dollyflow.engine.delta import BackendError, DeltaStore
from dollyflow.engine.session import session_for
from dollyflow.jobs import installed, job_module
from dollyflow.quickstart import prepare_inputs
from dollyflow.report.gather import build_report
from dollyflow.runs import load_run, run_dir, save_run, to_json
from dollyflow.summaries import ALL_TABLES, JOB_TABLES, human_line, job_status


def table_versions(store, names) -> dict:
    return {n: store.version(n) for n in names}


@contextlib.contextmanager
def captured(log_path: str | None):
    """Send everything written to stdout/stderr (this process and its children: torchrun,
    DeepSpeed) to ``log_path``; nothing is redirected when it is None."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    py = sys.stdout, sys.stderr
    with open(log_path, "a", buffering=1, encoding="utf-8", errors="replace") as f:
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            sys.stdout = sys.stderr = f
            yield
        finally:
            f.flush()
            sys.stdout, sys.stderr = py
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def sample_overrides(cfg, say) -> list[str]:
    """Overrides that point an input-less run at the sample: ``../shared/data/dolly-sample.jsonl``
    (the 100 real records) when present, else 200 generated ones; a tenth of them for test; and,
    when the configured tokenizer directory is absent, a small BPE trained on the sample."""
    root = cfg.tables.files_root()
    work = absolute(f"{root}/_demo_inputs") if not is_uri(root) else tempfile.mkdtemp(prefix="dollyflow-sample-")
    tok = cfg.model.tokenizer_name
    need_tok = not (os.path.isdir(tok) or (not tok.startswith((".", "/")) and "/" in tok))
    sample, tokenizer = prepare_inputs(Path(work), tokenizer=need_tok)
    say(f"ingest.input is empty: using the sample {sample}" + (f" and the tokenizer {tokenizer}" if need_tok else ""))
    extra = [f"ingest.input={sample}", "tokenize.test_size=0.1"]
    return extra + ([f"model.tokenizer={tokenizer}"] if need_tok else [])


def _plain(key: str) -> str:
    """A job's key in run.json as a plain name (run ids, log files): ``infer (base)`` -> ``infer-base``."""
    return key.replace(" (", "-").rstrip(")")


#: run.json's key (and the progress lines' label) of the base model's infer run
BASE_KEY = "infer (base)"


def baseline_infer(cfg, record: dict, i: int, step, say, log: str | None = None) -> bool:
    """``evaluate.baseline=base``: write the untrained base model the fine-tune started from
    beside it (:mod:`dollyflow.core.training.base`) and run infer with it (``step``) before the
    fine-tune's infer. A base that cannot be had (no train run in this pipeline, ``infer.model``
    not the model it trained, a hub name without network) is said and recorded as skipped, and
    the run goes on with the fine-tune alone. False when the base's infer failed. ``log``: where
    the output of building the base goes (None: not redirected)."""
    trained = (record["jobs"].get("train") or {}).get("summary") or {}
    reason, base = None, None
    if not trained.get("output_dir") or not trained.get("shard_dir"):
        reason = "no train run in this pipeline to take the base model from"
    elif os.path.normpath(str(cfg.infer.model)) != os.path.normpath(trained["output_dir"]):
        reason = f"infer.model ({redact_uri(str(cfg.infer.model))}) is not the model this run trained: its base is unknown"
    else:
        shard_dir = trained["shard_dir"]
        try:
            out = base_dir_for(trained["output_dir"], cfg.model.name, read_manifest(shard_dir), cfg.model.max_length)
            with captured(log):     # loading and saving print progress bars
                base = write_base_model(cfg.model.name, shard_dir, out, cfg.model.max_length)
            base["dir"] = out
        except Exception as exc:   # noqa: BLE001 - said and recorded: the fine-tune is evaluated alone
            reason = f"the base model {cfg.model.name} cannot be had ({type(exc).__name__}: {exc})"
    if reason:
        reason += "; evaluating the fine-tune alone"
        say(f"[{i}/{len(installed())}] {BASE_KEY} skipped: {reason}")
        record["jobs"][BASE_KEY] = {"status": "skipped", "summary": {"skipped": reason}}
        return True
    fine_tune, cfg.infer.model = cfg.infer.model, base["dir"]
    try:
        ok = step(i, "infer", BASE_KEY, BASE_KEY)
    finally:
        cfg.infer.model = fine_tune
    if ok:
        record["jobs"][BASE_KEY]["summary"]["base"] = {
            "model": cfg.model.name, "dir": base["dir"], "key": base["key"], "reused": base["reused"]}
    return ok


def compare_with_base(cfg, record: dict, say) -> None:
    """After both infers: evaluate compares the base (A) with the fine-tune (B), at this run's
    generation parameters, unless ``evaluate.models`` names the models itself."""
    base = record["jobs"][BASE_KEY]
    tuned = record["jobs"].get("infer") or {}
    if cfg.evaluate.models or "model_sha" not in (base.get("summary") or {}) or "model_sha" not in (
            tuned.get("summary") or {}):
        return
    a, b = base["summary"], tuned["summary"]
    if a["model_sha"] == b["model_sha"]:
        say(f"the fine-tune has the base model's weights (model_sha {a['model_sha'][:12]}): evaluating one side")
        return
    cfg.evaluate.models = [a["model_sha"], b["model_sha"]]
    if not cfg.evaluate.params_sha:
        cfg.evaluate.params_sha = sorted({a["params_sha"], b["params_sha"]})


def run_pipeline(overrides: list[str], *, preset: str | None = None, env: str | None = None,
                 conf: str | None = None, as_json: bool = False, verbose: bool = False,
                 report: bool = True) -> int:
    """Every installed job in order on one session, the run record, then the report; the exit
    code (0 done, 1 a job failed, 2 a config error). ``as_json``: stdout holds only the run
    record; ``verbose``: the jobs' own output is streamed instead of kept in their log files."""
    out = sys.stderr if as_json else sys.stdout     # as_json: stdout holds only the JSON document

    def say(msg: str) -> None:
        print(redact_uri(msg), file=out, flush=True)

    try:
        cfg = load_config("pipeline", overrides, preset=preset, env=env, conf=conf)
        if not cfg.ingest.input:   # no input given: the sample (../shared's real one, else generated)
            extra = sample_overrides(cfg, say)
            cfg = load_config("pipeline", [*extra, *overrides], preset=preset, env=env, conf=conf)
    except ConfigError as exc:
        print(f"dollyflow pipeline: config error: {exc}", file=sys.stderr)
        return 2

    t_start = time.time()
    spark = session_for(cfg)
    try:
        store = DeltaStore(spark, cfg.tables)
    except BackendError as exc:          # a clear message saying what to do, not a stack trace
        print(f"dollyflow pipeline: {exc}", file=sys.stderr)
        return 2
    files_root = absolute(cfg.tables.files_root())
    base_run = cfg.run_id
    record = {"run_id": base_run, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "preset": cfg.preset, "env": cfg.env, "files_root": files_root, "config": cfg.redacted(),
              "jobs": {}, "tables": {}, "status": "running"}
    logs = tempfile.mkdtemp(prefix="dollyflow-pipeline-")
    jobs = installed()
    say(f"dollyflow pipeline {base_run}: {' -> '.join(jobs)} (preset {cfg.preset}, env {cfg.env}); "
        f"tables under {store.location(cfg.tables.bronze).rsplit('/', 1)[0]}")
    failed = None

    def step(i: int, name: str, key: str, label: str) -> bool:
        """Run job ``name`` as step ``i``, recorded under ``key`` and shown as ``label``; False when it failed."""
        nonlocal failed
        module = job_module(name)
        head = f"[{i}/{len(jobs)}] {label:<8}"
        say(f"{head} running ...")
        cfg.job = name
        cfg.run_id = f"{base_run}-{_plain(key)}"
        tables = JOB_TABLES.get(name, [])
        before = table_versions(store, tables)
        log = None if verbose else os.path.join(logs, f"{_plain(key)}.log")
        t0 = time.time()
        try:
            with captured(log):
                summary = module.run(cfg, spark)
        except Exception as exc:   # noqa: BLE001 - reported, recorded, then the run stops
            failed = (key, exc, [j for j in jobs[i if key == name else i - 1:]])
            record["jobs"][key] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                   "seconds": round(time.time() - t0, 2)}
            if isinstance(getattr(exc, "summary", None), dict):   # what the job committed before failing
                record["jobs"][key]["summary"] = exc.summary
            say(f"{head} FAILED after {time.time() - t0:.1f} s: {type(exc).__name__}: {exc}")
            if log:
                say(f"---- last lines of its output ({log}) ----\n{_tail(log)}".rstrip())
            return False
        seconds = round(time.time() - t0, 2)
        summary["seconds"] = seconds
        after = table_versions(store, tables)
        changes = {n: [before[n], after[n]] for n in tables}
        status = job_status(name, summary, changes)
        record["jobs"][key] = {"status": status, "seconds": seconds, "changes": changes, "summary": summary}
        say(f"{head} {'unchanged' if status == 'unchanged' else 'done'} in {seconds:.1f} s: "
            f"{human_line(name, summary, changes)}")
        return True

    for i, name in enumerate(jobs, 1):
        module = job_module(name)
        if name == "infer" and not cfg.infer.model:
            trained = record["jobs"].get("train", {}).get("summary", {})
            if trained.get("output_dir"):
                cfg.infer.model = trained["output_dir"]     # score with the model just trained
        reason = module.skip_reason(cfg) if hasattr(module, "skip_reason") else None
        if reason:
            say(f"[{i}/{len(jobs)}] {name:<8} skipped: {reason}")
            record["jobs"][name] = {"status": "skipped", "summary": {"skipped": reason}}
            continue
        if name == "infer" and cfg.evaluate.baseline == "base":
            if not baseline_infer(cfg, record, i, step, say,
                                  None if verbose else os.path.join(logs, f"{_plain(BASE_KEY)}.log")):
                break
        if not step(i, name, name, name):
            break
        if name == "infer" and BASE_KEY in record["jobs"]:
            compare_with_base(cfg, record, say)

    rdir = run_dir(files_root, base_run)
    keys = {_plain(k): k for k in record["jobs"]}
    for name in os.listdir(logs):   # the jobs' own output, beside the run record
        with open(os.path.join(logs, name), "rb") as f:
            write_bytes(f"{rdir}/{name}", f.read())
        record["jobs"].get(keys.get(name[:-4], name[:-4]), {})["log"] = f"{rdir}/{name}"
    record["tables"] = {n: {"version": v, "location": store.location(n)}
                        for n, v in table_versions(store, ALL_TABLES).items()}
    ran = [j for j in record["jobs"].values() if j["status"] in ("changed", "unchanged")]
    record["unchanged"] = bool(ran) and all(j["status"] == "unchanged" for j in ran)
    record["status"] = "failed" if failed else "succeeded"
    if failed:
        record["failed_job"], record["not_run"] = failed[0], failed[2]
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record["seconds"] = round(time.time() - t_start, 2)
    save_run(record)
    if failed:
        name, exc, rest = failed
        msg = (f"pipeline {base_run} failed in {name} (job {jobs.index(name.split(' ')[0]) + 1} of {len(jobs)}): "
               f"{type(exc).__name__}: {exc}\n"
               f"pipeline {base_run} stopped there; not run: {', '.join(rest) or 'none'}; run record {rdir}/run.json")
        say(msg)
        if out is not sys.stderr:   # the reason also on stderr, where a scheduler's log looks
            print(redact_uri(msg), file=sys.stderr, flush=True)
        if as_json:
            print(to_json(record), flush=True)
        return 1
    if record["unchanged"]:
        say("unchanged: same inputs as the last run, no job wrote a new version of a data table")
    if report:
        t0 = time.time()
        record["report"] = build_report(spark, cfg, record)
        save_run(record)
        say(f"report ({time.time() - t0:.1f} s): {record['report']}")
    say(f"pipeline {base_run} finished in {time.time() - t_start:.1f} s; run record {rdir}/run.json")
    if as_json:
        print(to_json(record), flush=True)
    return 0


def rebuild_report(overrides: list[str], *, preset: str | None = None, env: str | None = None,
                   conf: str | None = None, run_id: str | None = None, out: str | None = None,
                   as_json: bool = False) -> int:
    """``dollyflow report [--run-id ID]``: rebuild the report of a recorded pipeline run from the
    table versions, manifest and metrics it recorded."""
    try:
        cfg = load_config("pipeline", overrides, preset=preset, env=env, conf=conf)
    except ConfigError as exc:
        print(f"dollyflow report: config error: {exc}", file=sys.stderr)
        return 2
    try:
        record = load_run(absolute(cfg.tables.files_root()), run_id)
    except FileNotFoundError as exc:
        print(f"dollyflow report: {exc}", file=sys.stderr)
        return 2
    path = build_report(session_for(cfg), cfg, record, out=out)
    if as_json:
        print(json.dumps({"run_id": record["run_id"], "report": path}), flush=True)
    else:
        print(f"report of pipeline run {record['run_id']}: {path}", flush=True)
    return 0
