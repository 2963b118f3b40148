"""The ``dollyflow`` command, the only place argv is parsed: one subcommand per job, plus
``pipeline``, ``report``, ``quickstart``, ``config`` and ``trace``.

    dollyflow ingest --preset tiny ingest.input=../shared/data/dolly-sample.jsonl
    dollyflow config dedupe dedupe.threshold=0.8
    dollyflow config train --describe                            # every key of the job, documented
    dollyflow pipeline --preset tiny ingest.input=data.jsonl     # every job, in order, + report
    dollyflow pipeline --preset tiny                             # the same on the sample data
    dollyflow report [--run-id ID]                               # rebuild a pipeline run's report
    dollyflow quickstart                                         # scripts/run_local.sh
    dollyflow trace <record_id | source_file:line> [--json]      # a record through every stage
    dollyflow trace --model <model dir> [--json]                 # the raw lines behind a model
    dollyflow train --no-spark --preset tiny train.processes=2   # torchrun on this machine, no Spark
    dollyflow tables upgrade-log [--dry-run]                     # make an older dollyflow's tables readable by Delta Spark

Each job is also its own console script (``dollyflow-ingest``) for a bundle's
``python_wheel_task``, and a spark-submit script (``jobs/ingest.py``). All of them take the same
arguments: ``--preset``, ``--env``, ``--conf`` and ``section.key=value`` overrides.
"""
from __future__ import annotations

import argparse
import sys
import time

from dollyflow.config import ConfigError, available, describe, load_config
from dollyflow.core import object_store
from dollyflow.core.trace import TraceError, parse_target, render_model, render_record
from dollyflow.engine.delta import BackendError
from dollyflow.engine.delta.legacy_log import UPGRADE_COMMAND, UpgradeRefused, legacy_tables, upgrade_log
from dollyflow.engine.delta.refs import schema_location
from dollyflow.engine.session import session_for
from dollyflow.jobs import ORDER as JOBS
from dollyflow.jobs import job_module
from dollyflow.pipeline import rebuild_report, run_pipeline
from dollyflow.quickstart import quickstart_args
from dollyflow.runs import to_json


def _choices(kind: str) -> str:
    try:
        return ", ".join(available(kind))
    except ConfigError:
        return ""


def job_parser(prog: str, kind: str = "job") -> argparse.ArgumentParser:
    """The arguments every command takes (``--preset``, ``--env``, ``--conf``, overrides), plus
    the options of ``kind``: ``job``, ``train``, ``config``, ``pipeline`` or ``report``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--preset", help=f"model preset in conf/model ({_choices('model')})")
    p.add_argument("--env", help=f"environment in conf/env ({_choices('env')})")
    p.add_argument("--conf", help="conf directory (default: the checkout's conf/ or the wheel's copy)")
    if kind == "train":
        p.add_argument("--no-spark", action="store_true",
                       help="train with torchrun on this machine without Spark (no train_runs row)")
    if kind == "config":
        p.add_argument("--describe", action="store_true",
                       help="print every key of the job's sections with its documentation and default")
    if kind == "trace":
        p.add_argument("--model", help="list the raw files and line ranges behind this model directory instead")
    if kind in ("pipeline", "report", "trace"):
        p.add_argument("--json", action="store_true", help="print one JSON document (the run record) on stdout")
    if kind == "pipeline":
        p.add_argument("--verbose", "-v", action="store_true", help="stream the jobs' own output")
        p.add_argument("--no-report", action="store_true", help="do not build the run report")
    if kind == "tables":
        p.add_argument("--dry-run", action="store_true", help="list the commits that would be rewritten; change nothing")
    if kind == "report":
        p.add_argument("--run-id", help="the pipeline run to report on (default: the newest)")
        p.add_argument("--out", help="write the HTML here instead of <files root>/reports/<run id>.html")
    if kind == "trace":
        p.add_argument("overrides", nargs="*", metavar="record_id|source_file:line [section.key=value]",
                       help="first (without --model): a record id (bronze.record_id) or a line of an input file "
                            "as given to ingest; then the overrides")
    else:
        p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def print_summary(summary: dict) -> None:
    """The job's summary as JSON on stdout, URIs' credentials redacted (job output is read by
    everyone with access to the job run)."""
    print(to_json(summary), flush=True)


def run_job(name: str, argv: list[str] | None = None) -> int:
    """Load the config for ``name``, get the Spark session, run the job, print its summary."""
    args = job_parser(f"dollyflow {name}", "train" if name == "train" else "job").parse_args(
        sys.argv[1:] if argv is None else argv)
    if getattr(args, "no_spark", False):
        overrides = [*args.overrides, "train.launcher=torchrun"]
    else:
        overrides = args.overrides
    try:
        cfg = load_config(name, overrides, preset=args.preset, env=args.env, conf=args.conf)
    except ConfigError as exc:
        print(f"dollyflow {name}: config error: {exc}", file=sys.stderr)
        return 2
    module = job_module(name)
    if getattr(args, "no_spark", False):
        object_store.activate(cfg.storage)     # storage: for the ranks' s3:// reads and the upload
        print_summary(module.run_without_spark(cfg))
        return 0
    spark = session_for(cfg)
    t0 = time.time()
    try:
        summary = module.run(cfg, spark)
    except BackendError as exc:          # tables.backend cannot serve these tables: what to do, no stack trace
        print(f"dollyflow {name}: {exc}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.time() - t0, 2)
    print_summary(summary)
    return 0


def show_config(argv: list[str]) -> int:
    rest = list(argv)
    job = rest.pop(0) if rest and not rest[0].startswith("-") and "=" not in rest[0] else ""
    args = job_parser(f"dollyflow config {job}", "config").parse_args(rest)
    try:
        if args.describe:
            print(describe(job, conf=args.conf), end="")
            return 0
        cfg = load_config(job, args.overrides, preset=args.preset, env=args.env, conf=args.conf)
    except ConfigError as exc:
        print(f"dollyflow config: {exc}", file=sys.stderr)
        return 2
    print(cfg.to_yaml(), end="")
    return 0


def pipeline(argv: list[str]) -> int:
    """Every installed job in order on one session, then the run report (:mod:`dollyflow.pipeline`)."""
    a = job_parser("dollyflow pipeline", "pipeline").parse_args(argv)
    return run_pipeline(a.overrides, preset=a.preset, env=a.env, conf=a.conf, as_json=a.json, verbose=a.verbose,
                        report=not a.no_report)


def report(argv: list[str]) -> int:
    a = job_parser("dollyflow report", "report").parse_args(argv)
    return rebuild_report(a.overrides, preset=a.preset, env=a.env, conf=a.conf, run_id=a.run_id, out=a.out,
                          as_json=a.json)


def quickstart(argv: list[str]) -> int:
    """The whole pipeline on local Spark with the tiny preset on the sample data; ``argv``:
    extra overrides, ``--env``/``--preset``."""
    return pipeline(quickstart_args(argv))


def tables(argv: list[str]) -> int:
    """``dollyflow tables upgrade-log``: rewrite the commits an earlier dollyflow's offline backend
    wrote with a top-level ``job`` in commitInfo (Delta Spark cannot parse them), for every table
    under the schema location (:func:`~dollyflow.engine.delta.legacy_log.upgrade_log`). No Spark."""
    if not argv or argv[0] != "upgrade-log":
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(f"usage: {UPGRADE_COMMAND} [--dry-run] [--preset P] [--env E] [section.key=value ...]\n\n"
              + (tables.__doc__ or ""), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    a = job_parser(UPGRADE_COMMAND, "tables").parse_args(argv[1:])
    try:
        cfg = load_config("", a.overrides, preset=a.preset, env=a.env, conf=a.conf)
    except ConfigError as exc:
        print(f"{UPGRADE_COMMAND}: config error: {exc}", file=sys.stderr)
        return 2
    root = schema_location(cfg.tables)
    if root is None:
        print(f"{UPGRADE_COMMAND}: nothing to do: "
              + ("tables.catalog is set (Unity Catalog tables are never written offline)" if cfg.tables.catalog
                 else "tables.warehouse is empty"))
        return 0
    found = legacy_tables(root, refresh=True)
    if not found:
        print(f"{UPGRADE_COMMAND}: no table under {root} has a commit with a top-level job; nothing to do")
        return 0
    failed = 0
    for c in found:
        try:
            done = upgrade_log(c.table, dry_run=a.dry_run)
        except UpgradeRefused as exc:
            print(f"{UPGRADE_COMMAND}: {c.name}: refused, nothing changed: {exc}", file=sys.stderr)
            failed += 1
            continue
        versions = f"{len(done.versions)} commit(s) (versions {', '.join(map(str, done.versions))})"
        if not done.versions:
            print(f"{c.name}: nothing left to rewrite")
        elif a.dry_run:
            print(f"{c.name}: would rewrite {versions} in {c.table}/_delta_log")
        else:
            print(f"{c.name}: rewrote {versions}; the original log is kept in {done.backup}")
    return 1 if failed else 0


def trace(argv: list[str]) -> int:
    """``dollyflow trace``: one record through every stage, or the raw lines behind a model
    (:mod:`dollyflow.engine.trace`); an unknown record, line or model exits with status 2."""
    a = job_parser("dollyflow trace", "trace").parse_intermixed_args(argv)
    overrides = list(a.overrides)      # with --model every positional is an override
    if not a.model and not overrides:
        print("dollyflow trace: give a record id, <source_file>:<line> or --model <dir>", file=sys.stderr)
        return 2
    try:
        target = None if a.model else parse_target(overrides.pop(0))
        cfg = load_config("trace", overrides, preset=a.preset, env=a.env, conf=a.conf)
    except (ConfigError, TraceError) as exc:
        print(f"dollyflow trace: {exc}", file=sys.stderr)
        return 2
    from dollyflow.engine.trace import trace_model, trace_record   # loads pyspark
    spark = session_for(cfg)
    try:
        result = trace_model(spark, cfg, a.model) if a.model else trace_record(spark, cfg, target)
    except TraceError as exc:
        print(f"dollyflow trace: {exc}", file=sys.stderr)
        return 2
    print(to_json(result) if a.json else (render_model(result) if a.model else render_record(result)), flush=True)
    return 0


COMMANDS = {"pipeline": pipeline, "report": report, "quickstart": quickstart, "config": show_config,
            "tables": tables, "trace": trace}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["pipeline", "report", "quickstart", "config", "tables", "trace"] + JOBS
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(f"usage: dollyflow {{{','.join(commands)}}} [--preset P] [--env E] [section.key=value ...]\n\n"
              + __doc__, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in COMMANDS:
        return COMMANDS[cmd](rest)
    return run_job(cmd, rest)


# The console scripts dollyflow-<job> (a bundle's python_wheel_task entry points): argv is sys.argv.
def ingest() -> int:
    return run_job("ingest")


def dedupe() -> int:
    return run_job("dedupe")


def filter() -> int:  # noqa: A001 - the console script dollyflow-filter
    return run_job("filter")


def tokenize() -> int:
    return run_job("tokenize")


def train() -> int:
    return run_job("train")


def infer() -> int:
    return run_job("infer")


def evaluate() -> int:
    return run_job("evaluate")
